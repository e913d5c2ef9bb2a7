"""Machine constants for the kernel cost model, measured once per machine and cached.

    constants() -> {"gemm_flops": FLOP/s of a large square matmul,
                    "bandwidth": B/s streaming a buffer larger than the last-level cache,
                    "op_overhead": s per small torch op (dispatch + Python),
                    "gemm_curve": {m: s for an [m, 4096] x [4096, 4096] GEMM (gemm.linear),
                                   weights not cached},
                    "skinny": whether skinny.py's kernel runs here (grouped_gemm's batched path),
                    "dnn_gain": gemm.linear's time / oneDNN's on a reordered weight (packed.dnn_linear),
                                median over m = 128, 512 on an expert-sized [2048, 1024] weight}
    shape_curve(k, n) -> {m: s}   the small-m curve of one weight shape, measured on first use
    gemm_time(m, k, n) -> s     elementwise_time(bytes) -> s     op_time(ops) -> s

Cached as JSON in $MOECC_CACHE_DIR or ~/.cache/moecc/ (machine.json, gemm_shapes.json), one entry
per (CPU, threads, torch version[, weight shape]). The GEMM curve captures what a FLOP count alone misses on CPUs: small-M GEMMs are
neither at peak FLOP/s nor at streaming bandwidth (BLAS packs the weight panel), so the time of
an expert with m tokens is read off a measured curve, scaled by the weight size.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time

import torch

from . import cache, parallel, skinny
from .gemm import linear

VERSION = 7               # bump when what is measured changes: old cache entries are measured again
CURVE_M = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256)
SHAPE_M = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)   # per weight shape, measured on first use
MIN_SHAPE_ELEMENTS = 2 ** 20                   # smaller weights: the square curve, scaled
MAX_SHAPE_ELEMENTS = 2 ** 24                   # larger (dense_masked's [E·R, H]): the same
CURVE_DIM = 4096          # [m, 4096] x [4096, 4096]: 64 MiB of weights, larger than the LLC
_override: dict | None = None


def cache_dir() -> pathlib.Path:
    return cache.cache_dir()


def machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|threads={parallel.threads()}|torch={torch.__version__}|v{VERSION}"


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after a warm-up: on a machine shared with other jobs the minimum
    is what the hardware does, the median is what the neighbours let it do. With one thread the
    process's CPU time is used (time spent descheduled does not count)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return max(best, 1e-9)


def measure(quick: bool = False) -> dict:
    """Measure the constants (a few seconds; `quick` uses small sizes, for tests)."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm_flops = 2 * n ** 3 / best_time(lambda: a @ b, 3)
    buf = torch.randn((4 if quick else 32) * 2 ** 20)                  # 16 / 128 MiB
    bandwidth = buf.numel() * 4 / best_time(buf.sum, 5)
    tiny = torch.ones(4)
    op_overhead = best_time(lambda: [tiny.add(1.0) for _ in range(100)], 5) / 100
    dim = 256 if quick else CURVE_DIM
    w = torch.randn(dim, dim)
    curve = {}
    for m in CURVE_M:
        x = torch.randn(m, dim)
        curve[m] = best_time(lambda: linear(x, w), 5 if m < 128 else 3)
    return {"gemm_flops": gemm_flops, "bandwidth": bandwidth, "op_overhead": op_overhead,
            "gemm_curve": {str(m): t for m, t in curve.items()}, "curve_dim": dim,
            "skinny": skinny.available(), "dnn_gain": dnn_gain(quick),
            "key": machine_key(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def dnn_gain(quick: bool = False) -> float:
    """gemm.linear's time over packed.dnn_linear's on an expert-sized weight (1.0: no oneDNN here)."""
    from . import packed
    if not packed.available("dnn"):
        return 1.0
    n, k = (256, 128) if quick else (2048, 1024)
    w = torch.randn(n, k)
    ratios = []
    for m in (128, 512):
        x = torch.randn(m, k)
        ratios.append(best_time(lambda: linear(x, w), 3) / best_time(lambda: packed.dnn_linear(x, w), 3))
    return float(sum(ratios) / len(ratios))


def load_or_measure(path: pathlib.Path, key: str, measure_fn=measure, fresh: bool = False) -> dict:
    """The entry `key` of the JSON cache at `path`; measured with `measure_fn` and written if absent
    (or if `fresh`)."""
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        table = {}                                    # a broken cache is measured again
    if fresh or key not in table:
        table[key] = measure_fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return table[key]


def remeasure(quick: bool = False) -> dict:
    """Measure now and replace this machine's cache entry (what `moecc bench` does first);
    constants set with `use` are kept as they are."""
    if _override is not None:
        return _override
    shapes = cache_dir() / "gemm_shapes.json"
    try:
        kept = {k: v for k, v in json.loads(shapes.read_text()).items() if not k.startswith(machine_key() + "|")}
        shapes.write_text(json.dumps(kept, indent=1))          # this machine's shapes: measured again
    except (OSError, ValueError):
        pass
    _cached.cache_clear()
    _shape_cached.cache_clear()
    return load_or_measure(cache_dir() / "machine.json", machine_key(), lambda: measure(quick), fresh=True)


@functools.lru_cache(maxsize=4)
def _cached(key: str, directory: str) -> dict:
    return load_or_measure(pathlib.Path(directory) / "machine.json", key)


def constants() -> dict:
    """This machine's constants: an override (tests, `use`), else the cache, else measured now."""
    return _override if _override is not None else _cached(machine_key(), str(cache_dir()))


def use(consts: dict | None) -> None:
    """Use these constants instead of the measured ones (None: back to measuring/caching)."""
    global _override
    _override = consts


def _interp(curve: dict, m: float) -> float:
    """Piecewise-linear in m through the measured points; linear in m beyond the last one."""
    pts = sorted((int(mm), t) for mm, t in curve.items())
    if m >= pts[-1][0]:
        return pts[-1][1] * m / pts[-1][0]
    if m <= pts[0][0]:
        return pts[0][1]
    i = next(i for i in range(1, len(pts)) if m <= pts[i][0])
    (m0, t0), (m1, t1) = pts[i - 1], pts[i]
    return t0 + (t1 - t0) * (m - m0) / (m1 - m0)


def measure_shape(k: int, n: int) -> dict:
    """{m: s} of gemm.linear for [m, k] x [n, k]ᵀ, m in SHAPE_M, on enough weight copies to
    exceed the cache (each call reads its weight from memory, as an expert's GEMM does)."""
    copies = max(2, -(-(96 * 2 ** 20) // (4 * k * n)))
    ws = [torch.randn(n, k) for _ in range(copies)]
    turn = [0]

    def call(x):
        turn[0] = (turn[0] + 1) % copies
        linear(x, ws[turn[0]])
    return {str(m): best_time(lambda x=torch.randn(m, k): call(x), 5) for m in SHAPE_M}


@functools.lru_cache(maxsize=256)
def _shape_cached(key: str, directory: str, k: int, n: int) -> dict:
    return load_or_measure(pathlib.Path(directory) / "gemm_shapes.json", f"{key}|{k}x{n}",
                           lambda: measure_shape(k, n))


def shape_curve(k: int, n: int) -> dict | None:
    """This weight shape's small-m curve: measured on first use (≈0.3 s) and cached; with constants
    set by `use`, only what they carry under "shapes" (tests never measure)."""
    if _override is not None:
        return _override.get("shapes", {}).get(f"{k}x{n}")
    if not MIN_SHAPE_ELEMENTS <= k * n <= MAX_SHAPE_ELEMENTS:
        return None
    return _shape_cached(machine_key(), str(cache_dir()), k, n)


def gemm_time(m: float, k: int, n: int) -> float:
    """Seconds for [m, k] x [k, n] with the weight read from memory. Small m (decode, fine-grained
    experts): the shape's own measured curve; beyond it, the square 4096 curve, scaled by k·n."""
    if m <= 0:
        return 0.0
    c = constants()
    generic = lambda mm: _interp(c["gemm_curve"], mm) * (k * n) / c["curve_dim"] ** 2   # noqa: E731
    curve = shape_curve(k, n)
    if not curve:
        return generic(m)
    top = max(int(mm) for mm in curve)
    return _interp(curve, m) if m <= top else _interp(curve, top) * generic(m) / generic(top)


def elementwise_time(nbytes: float) -> float:
    return nbytes / constants()["bandwidth"]


def op_time(ops: float) -> float:
    return ops * constants()["op_overhead"]
