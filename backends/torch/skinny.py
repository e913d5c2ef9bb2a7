"""A weight-streaming GEMM for few rows: y [m, N] = a [m, K] · w [N, K]ᵀ, float32, AVX2 + FMA, one thread.

    available() -> bool        compiled (gcc, once per machine, cached as a .so) and loadable here
    gemm(a, w) -> y            requires: float32, a rows contiguous (a.stride(1) == 1), w contiguous
    moe(y, xt, ids, weights, w_in, w_out, b_in, b_out, spec, (lo, hi))   y += a layer's routed experts
                               lo..hi-1 in ONE call (fits_moe): counting sort of the (token, slot)
                               pairs by expert, per expert ≤ 32 rows at a time: gather, gemm, bias,
                               activation (ACT, in C), gemm, bias, weighted scatter into y
    ffn_all(y, xt, w_in, w_out, spec)                                    y += ffn(xt) (a shared expert)

Why: an expert that m = 2..32 tokens hit reads its whole weight for 2·m·N·K FLOPs, so it should run
at memory bandwidth (m ≲ 5 on this CPU) or near peak FLOP/s. BLAS does neither: MKL and oneDNN pack
the [N, K] weight into a panel on every call (write + re-read) and their small-m kernels are tuned
for m ≥ 64. Measured on this project's CPU (1 thread, CPU time, weights read from memory):
MKL / oneDNN stream the weight at 5-9 GB/s for m = 2..8 (2-3x below `w.sum()` at 14-17 GB/s) and reach
20-35 GFLOP/s at m = 16..32 (peak ~75). This kernel keeps w in its own layout: for a tile of R weight
rows it streams each row once along K, with M ≤ 6 rows of `a` against it in 256-bit registers
(M·R accumulators, a horizontal sum at the end), so the weight is read from memory exactly once and
re-read from L1 for the next rows of `a` (rows of ≤ 512 floats: the next tile is prefetched): ~15 GB/s at m = 2 (the bandwidth), 1.3-2x faster than
MKL for m = 2..32.

The C source is below; it is compiled with the system's `cc` once per machine into a private cache
(`cache.private_dir("kernels")`: 0700, owner-checked) as `skinny-<sha256 of source, compiler, version,
flags>-<digest>.so`, under a file lock (one builder across threads and processes), its digest recorded and
checked before every load; a library that fails to load or lacks a symbol is rebuilt; a failing
compiler is remembered (`.failed`) and not retried. The torch backend builds it at compile time and
when an artifact is loaded, never inside a forward. Without a compiler, on a CPU without AVX2/FMA,
or on failure: available() is False, one warning is logged, and gemm.linear keeps BLAS.
Numerics: float32 FMAs in K order, 8 partial sums per output: within float32 rounding of BLAS;
the activations use libm's expf/erff/tanhf (within float32 rounding of torch's).
Why moe() is one C call: at decode the torch form (sort, gather, 2 grouped GEMMs, activation, scale,
index_add_) was ~45 torch ops, 0.5-0.6 ms of a 4.5 ms DeepSeek-like layer (1 thread).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import torch
from torch import Tensor

from .cache import check_private, locked, private_dir

MAX_M = 32             # above this MKL's packed kernels win (measured: m = 32 still 1.3x for this)

SOURCE = r"""
#include <immintrin.h>

#ifdef __AVX512F__           /* 16 lanes (FLAGS add -mavx512f where the CPU has it) */
typedef __m512 vec;
#define VW 16
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VZERO _mm512_setzero_ps
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 vec;
#define VW 8
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VZERO _mm256_setzero_ps
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* exp and erf on a vector (used by activate): exp as Cephes' expf (range reduction by ln 2, degree-6
   polynomial, 2^n by exponent bits), erf as torch's own Vectorized<float>::erf (Abramowitz-Stegun
   7.1.26: sign(x) (1 - t r(t) exp(-x^2)), t = 1 / (1 + 0.3275911 |x|), |error| <= 1.5e-7), so the
   kernel's GELU follows torch's vectorized GELU, not scalar erff, to a few ulp */
#ifdef __AVX512F__
#define VSET _mm512_set1_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VMUL _mm512_mul_ps
#define VDIV _mm512_div_ps
#define VMIN _mm512_min_ps
#define VMAX _mm512_max_ps
#define VSTORE _mm512_storeu_ps
#define VABS _mm512_abs_ps
static inline vec vnegwhere(vec e, vec x) {            /* x < 0 ? -e : e */
    return _mm512_mask_sub_ps(e, _mm512_cmp_ps_mask(x, VZERO(), _CMP_LT_OQ), VZERO(), e);
}
static inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec y, vec n) { return _mm512_scalef_ps(y, n); }
#else
#define VSET _mm256_set1_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VDIV _mm256_div_ps
#define VMIN _mm256_min_ps
#define VMAX _mm256_max_ps
#define VSTORE _mm256_storeu_ps
static inline vec VABS(vec x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline vec vnegwhere(vec e, vec x) { return _mm256_blendv_ps(e, _mm256_sub_ps(VZERO(), e), x); }
static inline vec vround(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec y, vec n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline vec vexp(vec x) {
    x = VMAX(VMIN(x, VSET(88.3762626647949f)), VSET(-87.3365447504f));
    vec n = vround(VMUL(x, VSET(1.44269504088896341f)));
    x = VFMA(n, VSET(-0.693359375f), x);
    x = VFMA(n, VSET(2.12194440e-4f), x);
    vec y = VSET(1.9875691500E-4f);
    y = VFMA(y, x, VSET(1.3981999507E-3f));
    y = VFMA(y, x, VSET(8.3334519073E-3f));
    y = VFMA(y, x, VSET(4.1665795894E-2f));
    y = VFMA(y, x, VSET(1.6666665459E-1f));
    y = VFMA(y, x, VSET(5.0000001201E-1f));
    y = VFMA(y, VMUL(x, x), VADD(x, VSET(1.0f)));
    return vpow2(y, n);
}

static inline vec verf(vec x) {
    vec ax = VABS(x), one = VSET(1.0f);
    vec t = VDIV(one, VFMA(VSET(0.3275911f), ax, one));
    vec r = VFMA(VSET(1.061405429f), t, VSET(-1.453152027f));
    r = VFMA(r, t, VSET(1.421413741f));
    r = VFMA(r, t, VSET(-0.284496736f));
    r = VFMA(r, t, VSET(0.254829592f));
    vec e = VFMA(VSUB(VZERO(), VMUL(vexp(VSUB(VZERO(), VMUL(x, x))), t)), r, one);
    return vnegwhere(e, x);
}

/* columns [0, F - F % VW) of one row: gelu (1), silu (3), swiglu (4), geglu (5), not interleaved;
   returns how many columns it did (the rest: the scalar loop) */
static long activate_vec(const float *hi, long R, float *ai, long F, int act) {
    if (!(act == 1 || act == 3 || act == 4 || act == 5)) return 0;
    int gated = act == 4 || act == 5;
    long j = 0;
    for (; j + VW <= F; j += VW) {
        vec g = VLOAD(hi + j), v;
        if (act == 1 || act == 5)
            v = VMUL(VMUL(g, VSET(0.5f)), VADD(VSET(1.0f), verf(VMUL(g, VSET(0.70710678118654752f)))));
        else
            v = VDIV(g, VADD(VSET(1.0f), vexp(VSUB(VZERO(), g))));
        if (gated) v = VMUL(v, VLOAD(hi + F + j));
        VSTORE(ai + j, v);
    }
    (void)R;
    return j;
}

/* y[i * ldy + r] = sum_k a[i * lda + k] * w[r * K + k] for i < M, r < R (compile-time M, R);
   pf: prefetch the next tile's R rows (contiguous after these) while streaming these */
static inline __attribute__((always_inline)) void tile(const float *a, long lda, const float *w, long K,
                                                      float *y, long ldy, const int M, const int R, int pf) {
    vec acc[6][6];
    for (int i = 0; i < M; i++)
        for (int r = 0; r < R; r++) acc[i][r] = VZERO();
    long k = 0;
    for (; k + VW <= K; k += VW) {
        vec av[6];
        for (int i = 0; i < M; i++) av[i] = VLOAD(a + i * lda + k);
        if (pf) {
            const float *p = w + R * K + R * k;
            for (int q = 0; q < R * VW / 8; q += 2) _mm_prefetch((const char *)(p + 8 * q), _MM_HINT_T0);
        }
        for (int r = 0; r < R; r++) {
            vec wv = VLOAD(w + r * K + k);
            for (int i = 0; i < M; i++) acc[i][r] = VFMA(av[i], wv, acc[i][r]);
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
        case 4: tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, 4, R, pf && i == 0); break;                   \
        case 5: tile(a + i * lda, lda, wn, K, y + i * ldy + n, ldy, 5, R, pf && i == 0); break;                   \
        }                                                                                           \
    }

/* y [m, N] (row stride ldy) = a [m, K] (row stride lda) . w [N, K]^T, w contiguous */
void skinny_gemm(const float *a, long lda, const float *w, long N, long K, float *y, long ldy, long m) {
    long n = 0;
    int pf = K <= 512;          /* short rows: the hardware prefetcher alone leaves 30-40% idle */
    if (m <= 2) {
        ROWS(6, 2)          /* 6 weight rows in flight: bandwidth-bound, more streams */
    } else if (m >= 5 && m <= 8 && K <= 1024) {
        pf = 1;             /* 5-8 rows: ONE pass of 6 rows of a over each 2-row weight tile, the next
                               tile prefetched: 1.1-1.3x the 3 x 4 tiles at K = 512..1024 (measured) */
        ROWS(2, 6)
    } else {
        ROWS(4, 3)          /* 12 accumulators + 3 rows of a: FMA-bound */
    }
    ROWS(1, 4)
}

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* the expert's activation in place of h [c, R] -> a [c, F] (ops.activate; act codes: ACT in skinny.py) */
static void activate(const float *h, long R, float *a, long F, long c, int act, int il, float alpha, float limit) {
    for (long i = 0; i < c; i++) {
        const float *hi = h + i * R;
        float *ai = a + i * F;
        for (long j = il ? 0 : activate_vec(hi, R, ai, F, act); j < F; j++) {
            int gated = act >= 4 && act != 10;                                                  /* 10: relu2 */
            float g = gated ? (il ? hi[2 * j] : hi[j]) : hi[j];
            float u = gated ? (il ? hi[2 * j + 1] : hi[F + j]) : 1.0f, v;
            switch (act) {
            case 0: v = g <= 0.0f ? 0.0f : g; break;                          /* relu (NaN stays NaN) */
            case 10: v = g <= 0.0f ? 0.0f : g * g; break;                                    /* relu2 */
            case 1: case 5: v = 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)); break;    /* gelu, geglu */
            case 2: case 7: v = 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g))); break;
            case 6: g = g < limit ? g : limit; u = u < -limit ? -limit : (u > limit ? limit : u);   /* swiglu_oai */
                    v = g / (1.0f + expf(-alpha * g)); u += 1.0f; break;
            case 8: g = g < limit ? g : limit; u = u < -limit ? -limit : (u > limit ? limit : u);   /* swiglu_clamp */
                    v = g / (1.0f + expf(-g)); break;
            case 9: v = tanhf(g / limit) * limit / (1.0f + expf(-g)); u = tanhf(u / alpha) * alpha; break;  /* softcap */
            default: v = g / (1.0f + expf(-g));                                                /* silu, swiglu */
            }
            ai[j] = v * u;
        }
    }
}

/* rows tok[0..c) of x (row stride H) through one FFN (w_in [R, H], w_out [H, F], biases or NULL),
   y[tok[i]] += scale[i] * ffn(x[tok[i]]), in chunks of <= 32 rows; buf: 32 * (2H + R + F) floats */
static void expert_rows(const float *x, long H, const long *tok, const float *scale, long c,
                        const float *w_in, long R, const float *w_out, long F, const float *b_in, const float *b_out,
                        int act, int il, float alpha, float limit, float *y, float *buf) {
    float *xa = buf, *h = xa + 32 * H, *a = h + 32 * R, *o = a + 32 * F;
    for (long c0 = 0; c0 < c; c0 += 32) {
        long m = c - c0 < 32 ? c - c0 : 32;
        for (long i = 0; i < m; i++) memcpy(xa + i * H, x + tok[c0 + i] * H, H * sizeof(float));
        skinny_gemm(xa, H, w_in, R, H, h, R, m);
        if (b_in) for (long i = 0; i < m; i++) for (long j = 0; j < R; j++) h[i * R + j] += b_in[j];
        activate(h, R, a, F, m, act, il, alpha, limit);
        skinny_gemm(a, F, w_out, H, F, o, H, m);
        for (long i = 0; i < m; i++) {
            float s = scale[c0 + i], *yt = y + tok[c0 + i] * H;
            const float *oi = o + i * H;
            if (b_out) for (long j = 0; j < H; j++) yt[j] += s * (oi[j] + b_out[j]);
            else for (long j = 0; j < H; j++) yt[j] += s * oi[j];
        }
    }
}

/* A whole routed MoE layer's experts e in [e_lo, e_hi) in ONE call: x [T, H], ids/wts [T, S] (id < 0:
   dropped), w_in [E, R, H], w_out [E, H, F], b_in [E, R] / b_out [E, H] or NULL; y [T, H] += the
   weighted expert outputs. Pairs are counting-sorted by expert (token order kept, as the reference's). */
int skinny_moe(const float *x, long T, long H, const long *ids, const float *wts, long S, long E,
               const float *w_in, long R, const float *w_out, long F, const float *b_in, const float *b_out,
               int act, int il, float alpha, float limit, long e_lo, long e_hi, float *y) {
    long n = T * S, *start = calloc(E + 1, sizeof(long)), *tok = malloc((n + 1) * sizeof(long));
    float *scale = malloc((n + 1) * sizeof(float)), *buf = malloc(32 * (2 * H + R + F) * sizeof(float));
    if (!start || !tok || !scale || !buf) { free(start); free(tok); free(scale); free(buf); return -1; }
    for (long p = 0; p < n; p++) if (ids[p] >= e_lo && ids[p] < e_hi) start[ids[p] + 1]++;
    for (long e = 0; e < E; e++) start[e + 1] += start[e];
    long *fill = calloc(E, sizeof(long));
    if (!fill) { free(start); free(tok); free(scale); free(buf); return -1; }
    for (long p = 0; p < n; p++) {
        long e = ids[p];
        if (e >= e_lo && e < e_hi) { long q = start[e] + fill[e]++; tok[q] = p / S; scale[q] = wts[p]; }
    }
    for (long e = e_lo; e < e_hi; e++)
        if (start[e + 1] > start[e])
            expert_rows(x, H, tok + start[e], scale + start[e], start[e + 1] - start[e], w_in + e * R * H, R,
                        w_out + e * H * F, F, b_in ? b_in + e * R : 0, b_out ? b_out + e * H : 0,
                        act, il, alpha, limit, y, buf);
    free(start); free(tok); free(scale); free(buf); free(fill);
    return 0;
}

/* skinny_moe over `parts` runs of experts [bounds[i], bounds[i + 1]) at once, run i into ys + i * T * H
   (zeroed here, by its thread), then ys[0] = ys[0] + ys[1] + ... in run order, rows split over the
   threads: on the OpenMP pool of the process's libgomp (torch's, already loaded: its threads are the
   ones spinning after torch's last parallel region) */
int skinny_moe_parts(const float *x, long T, long H, const long *ids, const float *wts, long S, long E,
                     const float *w_in, long R, const float *w_out, long F, const float *b_in, const float *b_out,
                     int act, int il, float alpha, float limit, const long *bounds, long parts, float *ys) {
    int bad = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(parts) reduction(|: bad)
#endif
    {
#ifdef _OPENMP
        #pragma omp for schedule(static, 1)
#endif
        for (long i = 0; i < parts; i++) {
            memset(ys + i * T * H, 0, T * H * sizeof(float));
            bad |= skinny_moe(x, T, H, ids, wts, S, E, w_in, R, w_out, F, b_in, b_out, act, il, alpha, limit,
                              bounds[i], bounds[i + 1], ys + i * T * H) != 0;
        }
#ifdef _OPENMP
        #pragma omp for schedule(static)
#endif
        for (long r = 0; r < T; r++)
            for (long i = 1; i < parts; i++) {
                float *dst = ys + r * H;
                const float *src = ys + i * T * H + r * H;
                for (long h = 0; h < H; h++) dst[h] += src[h];
            }
    }
    return bad ? -1 : 0;
}

/* the shared expert on every row of x [T, H]: y += ffn(x) (scale 1; a gated one goes through torch) */
int skinny_ffn_all(const float *x, long T, long H, const float *w_in, long R, const float *w_out, long F,
                   int act, int il, float alpha, float limit, float *y) {
    long *tok = malloc((T + 1) * sizeof(long));
    float *scale = malloc((T + 1) * sizeof(float)), *buf = malloc(32 * (2 * H + R + F) * sizeof(float));
    if (!tok || !scale || !buf) { free(tok); free(scale); free(buf); return -1; }
    for (long t = 0; t < T; t++) { tok[t] = t; scale[t] = 1.0f; }
    expert_rows(x, H, tok, scale, T, w_in, R, w_out, F, 0, 0, act, il, alpha, limit, y, buf);
    free(tok); free(scale); free(buf);
    return 0;
}

"""


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:                                   # noqa: BLE001 - older torch: assume not
        return False


def _flags() -> tuple:
    """-mavx512f where torch finds AVX-512 on this CPU (the tile then runs 16 lanes: 1.5-2x per GEMM at
    m = 8..32 on an AVX-512 AMD EPYC with 512-bit FMA units; another summation order than 8 lanes)."""
    try:
        wide = torch.backends.cpu.get_cpu_capability() == "AVX512"
    except Exception:                                   # noqa: BLE001 - older torch: 8 lanes
        wide = False
    return ("-O3", "-mavx2", "-mfma", *(("-mavx512f",) if wide else ()), "-fopenmp", "-shared", "-fPIC")


FLAGS = _flags()
LANES = 16 if "-mavx512f" in FLAGS else 8            # the tile's vector width
MOE_CACHED_BYTES = 2 ** 20   # an expert's two weights up to this size stay in cache over moe's 32-row chunks


def moe_max_rows(expert_bytes: int) -> int:
    """The most rows per expert for which one moe(...) call beats the BLAS path: MAX_M, and at 16 lanes 96
    where the expert's weights stay cached between its 32-row chunks (MiniLM's FFN split E=8: 1 thread,
    moe at ≤ 96 rows vs oneDNN per expert above 32: T = 128 0.27-0.31x of dense vs 0.44; T = 256 0.26-0.31
    vs 0.32, measured 2026-12-04 on a quiet AVX-512 AMD EPYC)."""
    return 96 if LANES == 16 and expert_bytes <= MOE_CACHED_BYTES else MAX_M
SYMBOLS = ("skinny_gemm", "skinny_moe", "skinny_ffn_all", "skinny_moe_parts")
log = logging.getLogger("moecc.kernels")
_lock = threading.Lock()


def _compiler() -> tuple[str, str] | None:
    """(path, version line) of the C compiler ($CC, cc or gcc), or None."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, (out.splitlines() or [""])[0]


def build_key(cc: str, version: str) -> str:
    """Content address of the library: the source, the compiler (path and version) and the flags."""
    return hashlib.sha256("\0".join([SOURCE, cc, version, *FLAGS]).encode()).hexdigest()[:20]


def _build(cc: str, pointer: pathlib.Path) -> None:
    """Compile into the pointer's directory as <stem>-<digest>.so (a new name per content, so a
    process that loaded a bad library still loads the rebuilt one) and record its digest in `pointer`."""
    with tempfile.TemporaryDirectory(dir=pointer.parent) as tmp:
        src = os.path.join(tmp, "skinny.c")
        with open(src, "w") as f:
            f.write(SOURCE)
        out = os.path.join(tmp, "skinny.so")
        r = subprocess.run([cc, *FLAGS, "-o", out, src, "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"{os.path.basename(cc)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        os.chmod(out, 0o700)
        digest = _sha256(out)
        os.replace(out, _library(pointer, digest))
        tmp_pointer = pointer.with_suffix(".tmp")
        tmp_pointer.write_text(digest)
        os.replace(tmp_pointer, pointer)


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _library(pointer: pathlib.Path, digest: str) -> pathlib.Path:
    return pointer.with_name(f"{pointer.stem}-{digest[:16]}.so")


def _open(pointer: pathlib.Path):
    """Load the library the pointer names if it is ours, private and has the recorded digest."""
    check_private(pointer)
    digest = pointer.read_text().strip()
    path = _library(pointer, digest)
    check_private(path)
    if _sha256(path) != digest:
        raise OSError(f"{path.name}: its checksum does not match the one recorded at build time")
    lib = ctypes.CDLL(str(path))
    for name in SYMBOLS:
        getattr(lib, name)                              # AttributeError: a symbol is missing
    return lib


def _load_or_build():
    """The library: loaded from the private cache, else (re)built there once under a lock. Raises
    with the reason; a compiler failure is remembered (`.failed`) so other processes do not retry."""
    found = _compiler()
    if found is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    directory = private_dir("kernels")
    pointer = directory / f"skinny-{build_key(*found)}.sha256"
    failed = pointer.with_suffix(".failed")
    with locked(directory / "build.lock"):
        if failed.exists():
            raise RuntimeError(f"an earlier build failed ({failed.read_text().strip()}); delete {failed} to retry")
        if pointer.exists():
            try:
                return _open(pointer)
            except (OSError, AttributeError) as e:
                log.warning("cached C kernel did not load (%s): rebuilding it", e)
                pointer.unlink(missing_ok=True)
        try:
            _build(found[0], pointer)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            failed.write_text(str(e))
            raise RuntimeError(str(e)) from None
        log.info("built C kernel %s", pointer.with_suffix(".so"))
        return _open(pointer)


def _lib():
    """The loaded kernel, or None (see module doc); built or loaded once per process (thread-safe),
    and one logged warning when it is unavailable and BLAS is used instead."""
    global _loaded
    if _loaded is not False:
        return _loaded
    with _lock:
        if _loaded is not False:
            return _loaded
        if os.environ.get("MOECC_NO_SKINNY") or not _cpu_ok():
            _loaded = None
            return None
        try:
            lib = _load_or_build()
        except (OSError, RuntimeError, AttributeError) as e:
            log.warning("the C skinny-GEMM kernel is unavailable (%s); using BLAS (slower for few tokens)", e)
            _loaded = None
            return None
        fn, moe_fn, ffn_fn, parts_fn = lib.skinny_gemm, lib.skinny_moe, lib.skinny_ffn_all, lib.skinny_moe_parts
        L, P, I, Fl = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        fn.argtypes = [P, L, P, L, L, P, L, L]
        moe_fn.argtypes = [P, L, L, P, P, L, L, P, L, P, L, P, P, I, I, Fl, Fl, L, L, P]
        parts_fn.argtypes = [P, L, L, P, P, L, L, P, L, P, L, P, P, I, I, Fl, Fl, P, L, P]
        ffn_fn.argtypes = [P, L, L, P, L, P, L, I, I, Fl, Fl, P]
        fn.restype = None
        moe_fn.restype = ffn_fn.restype = parts_fn.restype = ctypes.c_int
        _loaded = (fn, moe_fn, ffn_fn, parts_fn)   # ctypes releases the GIL during the call (parallel.py threads)
        return _loaded


def reset() -> None:
    """Forget the loaded kernel (tests; the next call loads or builds again)."""
    global _loaded
    with _lock:
        _loaded = False


_loaded = False        # False: not tried yet; None: unavailable; else the three functions


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


ACT = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "swiglu": 4, "geglu": 5, "swiglu_oai": 6, "geglu_tanh": 7, "swiglu_clamp": 8, "swiglu_softcap": 9, "relu2": 10}


def _f32(*ts) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu") for t in ts)


def fits_moe(xt: Tensor, w_in: Tensor, w_out: Tensor, b_in, b_out, spec) -> bool:
    """Whether moe(...) applies: float32 contiguous tensors, a known activation, C kernel loaded."""
    return (spec.activation in ACT and _f32(xt, w_in, w_out, b_in, b_out) and w_in.dim() == 3
            and xt.shape[1] == w_in.shape[2] >= 8 and w_out.shape[2] >= 8 and available())


def _act(spec) -> tuple:
    return ACT[spec.activation], int(bool(spec.interleaved)), float(spec.act_alpha), float(spec.act_limit)


def moe(y: Tensor, xt: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, b_in, b_out, spec,
        experts: tuple[int, int]) -> Tensor:
    """y [T, H] += Σ over (token, slot) routed to an expert in [lo, hi) of weight · ffn_e(x[token]):
    a layer's routed experts in ONE C call (counting sort by expert, gather, skinny GEMM, activation,
    skinny GEMM, weighted scatter; ≤ 32 rows per step). Callers check `fits_moe`; y float32 contiguous."""
    ids = ids.contiguous() if ids.dtype == torch.int64 else ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    (T, H), (E, R, _), Fw = xt.shape, w_in.shape, w_out.shape[2]
    p = lambda t: None if t is None else t.data_ptr()      # noqa: E731
    if _lib()[1](xt.data_ptr(), T, H, ids.data_ptr(), weights.data_ptr(), ids.shape[1] if ids.dim() == 2 else 1,
                 E, w_in.data_ptr(), R, w_out.data_ptr(), Fw, p(b_in), p(b_out), *_act(spec), experts[0],
                 experts[1], y.data_ptr()):
        raise MemoryError("skinny.moe: out of memory")
    return y


def moe_parts(xt: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, b_in, b_out, spec,
              bounds: list[int]) -> Tensor:
    """Σ over runs i of moe(zeros, ..., experts=(bounds[i], bounds[i + 1])), the runs at once on the
    OpenMP threads of torch's libgomp (one C call; no Python worker), their results added in run order
    inside the same call, rows split over the threads (what kernels._accumulate does with parallel.py's
    workers: the same sums)."""
    ids = ids.contiguous() if ids.dtype == torch.int64 else ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    (T, H), (E, R, _), Fw = xt.shape, w_in.shape, w_out.shape[2]
    parts = len(bounds) - 1
    ys = torch.empty(parts, T, H, dtype=torch.float32)
    b = torch.tensor(bounds, dtype=torch.int64)
    p = lambda t: None if t is None else t.data_ptr()      # noqa: E731
    if _lib()[3](xt.data_ptr(), T, H, ids.data_ptr(), weights.data_ptr(), ids.shape[1] if ids.dim() == 2 else 1,
                 E, w_in.data_ptr(), R, w_out.data_ptr(), Fw, p(b_in), p(b_out), *_act(spec), b.data_ptr(),
                 parts, ys.data_ptr()):
        raise MemoryError("skinny.moe_parts: out of memory")
    return ys[0]


def fits_ffn_all(xt: Tensor, w_in: Tensor, w_out: Tensor, gate, spec) -> bool:
    """Whether ffn_all(...) applies: an ungated shared expert, ≤ MAX_M tokens, float32 contiguous."""
    return (gate is None and xt.shape[0] <= MAX_M and spec.shared_ffn >= 8 and _f32(w_in, w_out)
            and available())


def ffn_all(y: Tensor, xt: Tensor, w_in: Tensor, w_out: Tensor, spec) -> Tensor:
    """y [T, H] += ffn(xt) (an ungated shared expert) in one C call; callers check `fits_ffn_all`."""
    (T, H), R, Fw = xt.shape, w_in.shape[0], w_out.shape[1]
    if _lib()[2](xt.data_ptr(), T, H, w_in.data_ptr(), R, w_out.data_ptr(), Fw, *_act(spec), y.data_ptr()):
        raise MemoryError("skinny.ffn_all: out of memory")
    return y
