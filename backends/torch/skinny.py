"""A weight-streaming GEMM for few rows: y [m, N] = a [m, K] · w [N, K]ᵀ, float32, AVX2 + FMA, one thread.

    available() -> bool        compiled (gcc, once per machine, cached as a .so) and loadable here
    gemm(a, w) -> y            requires: float32, a rows contiguous (a.stride(1) == 1), w contiguous

Why: an expert that m = 2..32 tokens hit reads its whole weight for 2·m·N·K FLOPs, so it should run
at memory bandwidth (m ≲ 5 on this CPU) or near peak FLOP/s. BLAS does neither: MKL and oneDNN pack
the [N, K] weight into a panel on every call (write + re-read) and their small-m kernels are tuned
for m ≥ 64. Measured on this project's CPU (1 thread, CPU time, weights read from memory):
MKL / oneDNN stream the weight at 5-9 GB/s for m = 2..8 (2-3x below `w.sum()` at 14-17 GB/s) and reach
20-35 GFLOP/s at m = 16..32 (peak ~75). This kernel keeps w in its own layout: for a tile of R weight
rows it streams each row once along K, with M ≤ 4 rows of `a` against it in 256-bit registers
(M·R accumulators, a horizontal sum at the end), so the weight is read from memory exactly once and
re-read from L1 for the next rows of `a` (rows of ≤ 512 floats: the next tile is prefetched): ~15 GB/s at m = 2 (the bandwidth), 1.3-2x faster than
MKL for m = 2..32.

The C source is below; it is compiled with the system's `cc` on first use into
`machine.cache_dir()/skinny-<hash>.so` (atomic rename: parallel test workers are safe). Without a
compiler, on a CPU without AVX2/FMA, or on failure: available() is False and gemm.linear keeps BLAS.
Numerics: float32 FMAs in K order, 8 partial sums per output: within float32 rounding of BLAS.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch
from torch import Tensor

MAX_M = 32             # above this MKL's packed kernels win (measured: m = 32 still 1.3x for this)

SOURCE = r"""
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[i * ldy + r] = sum_k a[i * lda + k] * w[r * K + k] for i < M, r < R (compile-time M, R);
   pf: prefetch the next tile's R rows (contiguous after these) while streaming these */
static inline __attribute__((always_inline)) void tile(const float *a, long lda, const float *w, long K,
                                                      float *y, long ldy, const int M, const int R, int pf) {
    __m256 acc[4][6];
    for (int i = 0; i < M; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 av[4];
        for (int i = 0; i < M; i++) av[i] = _mm256_loadu_ps(a + i * lda + k);
        if (pf) {
            const float *p = w + R * K + R * k;
            for (int q = 0; q < R; q += 2) _mm_prefetch((const char *)(p + 8 * q), _MM_HINT_T0);
        }
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int i = 0; i < M; i++) acc[i][r] = _mm256_fmadd_ps(av[i], wv, acc[i][r]);
        }
    }
    for (int i = 0; i < M; i++)
        for (int r = 0; r < R; r++) {
            float s = hsum(acc[i][r]);
            for (long kk = k; kk < K; kk++) s += a[i * lda + kk] * w[r * K + kk];
            y[i * ldy + r] = s;
        }
}

/* all rows of a against weight rows [n, n + R), for every n */
#define ROWS(R, MC)                                                                                 \
    for (; n + R <= N; n += R) {                                                                    \
        const float *wn = w + n * K;                                                                \
        long i = 0;                                                                                 \
        for (; i + MC <= m; i += MC) tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, MC, R, pf && i == 0);     \
        switch (m - i) {                                                                            \
        case 1: tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, 1, R, pf && i == 0); break;                   \
        case 2: tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, 2, R, pf && i == 0); break;                   \
        case 3: tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, 3, R, pf && i == 0); break;                   \
        }                                                                                           \
    }

/* y [m, N] (row stride ldy) = a [m, K] (row stride lda) . w [N, K]^T, w contiguous */
void skinny_gemm(const float *a, long lda, const float *w, long N, long K, float *y, long ldy, long m) {
    long n = 0;
    const int pf = K <= 512;    /* short rows: the hardware prefetcher alone leaves 30-40% idle */
    if (m <= 2) {
        ROWS(6, 2)          /* 6 weight rows in flight: bandwidth-bound, more streams */
    } else {
        ROWS(4, 3)          /* 12 accumulators + 3 rows of a: FMA-bound */
    }
    ROWS(1, 4)
}

/* segments of rows, each against its own expert's weight: for g < G, (r0, rows, e) = segs[3g..3g+2]:
   y[r0 : r0 + rows] = a[r0 : r0 + rows] . w[e]^T, w [E, N, K] contiguous (wstride = N * K) */
void skinny_grouped(const float *a, long lda, const float *w, long wstride, long N, long K, float *y, long ldy,
                    const long *segs, long G) {
    for (long g = 0; g < G; g++)
        skinny_gemm(a + segs[3 * g] * lda, lda, w + segs[3 * g + 2] * wstride, N, K, y + segs[3 * g] * ldy, ldy,
                    segs[3 * g + 1]);
}
"""


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:                                   # noqa: BLE001 - older torch: assume not
        return False


def _build(path) -> None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "skinny.c")
        with open(src, "w") as f:
            f.write(SOURCE)
        out = path.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-o", str(out), src],
                       check=True, capture_output=True, timeout=120)
        out.replace(path)


@functools.lru_cache(maxsize=1)
def _lib():
    """The loaded kernel, or None (see module doc)."""
    if os.environ.get("MOECC_NO_SKINNY") or not _cpu_ok():
        return None
    from .machine import cache_dir
    path = cache_dir() / f"skinny-{hashlib.sha1(SOURCE.encode()).hexdigest()[:12]}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    fn, grouped_fn = lib.skinny_gemm, lib.skinny_grouped
    L, P = ctypes.c_long, ctypes.c_void_p
    fn.argtypes = [P, L, P, L, L, P, L, L]
    grouped_fn.argtypes = [P, L, P, L, L, L, P, L, P, L]
    fn.restype = grouped_fn.restype = None
    return fn, grouped_fn               # ctypes releases the GIL during the call (parallel.py threads)


def available() -> bool:
    return _lib() is not None


def fits(a: Tensor, w: Tensor) -> bool:
    """Whether gemm(a, w) applies: float32, 1 ≤ m ≤ MAX_M, K ≥ 8, rows of a and all of w contiguous."""
    return (a.dtype == torch.float32 and w.dtype == torch.float32 and a.dim() == 2 and w.dim() == 2
            and 1 <= a.shape[0] <= MAX_M and a.shape[1] >= 8 and a.stride(1) == 1 and w.is_contiguous()
            and a.device.type == "cpu" and w.device.type == "cpu" and available())


def gemm(a: Tensor, w: Tensor) -> Tensor:
    """a [m, K] · w [N, K]ᵀ -> [m, N] (callers check `fits`). No autograd: for the inference
    kernels only (the op's backward recomputes the reference)."""
    (m, K), N = a.shape, w.shape[0]
    y = torch.empty(m, N, dtype=torch.float32)
    _lib()[0](a.data_ptr(), a.stride(0), w.data_ptr(), N, K, y.data_ptr(), N, m)
    return y


def fits_grouped(a: Tensor, w: Tensor) -> bool:
    """Whether grouped(a, w, segs) applies: float32, rows of a contiguous, w [E, N, K] contiguous."""
    return (a.dtype == torch.float32 and w.dtype == torch.float32 and a.dim() == 2 and w.dim() == 3
            and a.shape[1] == w.shape[2] >= 8 and a.stride(1) == 1 and w.is_contiguous()
            and a.device.type == "cpu" and w.device.type == "cpu" and available())


def grouped(a: Tensor, w: Tensor, segs: Tensor) -> Tensor:
    """Rows of a [n, K] by segment, each times its expert's w[e]ᵀ ([E, N, K]) -> [n, N]; segs [G, 3]
    int64 (first row, rows ≤ MAX_M, expert), covering every row of a (rows not covered stay garbage).
    ONE call for all the small experts of a layer: no Python or dispatch cost per expert."""
    (n, K), N = a.shape, w.shape[1]
    y = torch.empty(n, N, dtype=torch.float32)
    segs = segs.contiguous()
    _lib()[1](a.data_ptr(), a.stride(0), w.data_ptr(), N * K, N, K, y.data_ptr(), N, segs.data_ptr(), segs.shape[0])
    return y
