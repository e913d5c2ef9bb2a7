"""Machine constants for the kernel cost model, measured once per machine and cached.

    constants() -> {"gemm_flops": FLOP/s of a large square matmul,
                    "bandwidth": B/s streaming a buffer larger than the last-level cache,
                    "op_overhead": s per small torch op (dispatch + Python),
                    "gemm_curve": {m: s for an [m, 4096] x [4096, 4096] GEMM (gemm.linear_into),
                                   weights not cached}}
    gemm_time(m, k, n) -> s     elementwise_time(bytes) -> s     op_time(ops) -> s

Cached as JSON in $MOECC_CACHE_DIR or ~/.cache/moecc/machine.json, one entry per (CPU, threads,
torch version). The GEMM curve captures what a FLOP count alone misses on CPUs: small-M GEMMs are
neither at peak FLOP/s nor at streaming bandwidth (BLAS packs the weight panel), so the time of
an expert with m tokens is read off a measured curve, scaled by the weight size.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import statistics
import time

import torch

from .gemm import linear_into

VERSION = 2               # bump when what is measured changes: old cache entries are measured again
CURVE_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CURVE_DIM = 4096          # [m, 4096] x [4096, 4096]: 64 MiB of weights, larger than the LLC
_override: dict | None = None


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOECC_CACHE_DIR") or pathlib.Path.home() / ".cache" / "moecc")


def machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|v{VERSION}"


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(quick: bool = False) -> dict:
    """Measure the constants (about 2 s; `quick` uses small sizes, for tests)."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm_flops = 2 * n ** 3 / _median_time(lambda: a @ b, 3)
    buf = torch.randn((4 if quick else 32) * 2 ** 20)                  # 16 / 128 MiB
    bandwidth = buf.numel() * 4 / _median_time(buf.sum, 5)
    tiny = torch.ones(4)
    op_overhead = _median_time(lambda: [tiny.add(1.0) for _ in range(100)], 5) / 100
    dim = 256 if quick else CURVE_DIM
    w = torch.randn(dim, dim)
    curve = {}
    for m in CURVE_M:
        x, out = torch.randn(m, dim), torch.empty(m, dim)
        curve[m] = _median_time(lambda: linear_into(x, w, None, out), 3)
    return {"gemm_flops": gemm_flops, "bandwidth": bandwidth, "op_overhead": op_overhead,
            "gemm_curve": {str(m): t for m, t in curve.items()}, "curve_dim": dim,
            "key": machine_key(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_or_measure(path: pathlib.Path, key: str, measure_fn=measure) -> dict:
    """The entry `key` of the JSON cache at `path`; measured with `measure_fn` and written if absent."""
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        table = {}                                    # a broken cache is measured again
    if key not in table:
        table[key] = measure_fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return table[key]


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


def gemm_time(m: float, k: int, n: int) -> float:
    """Seconds for [m, k] x [k, n] with a weight read from memory: the measured curve, scaled."""
    if m <= 0:
        return 0.0
    c = constants()
    dim = c["curve_dim"]
    pts = sorted((int(mm), t) for mm, t in c["gemm_curve"].items())
    scale = (k * n) / (dim * dim)
    if m >= pts[-1][0]:                                  # beyond the curve: linear in m
        return pts[-1][1] * scale * m / pts[-1][0]
    if m <= pts[0][0]:
        return pts[0][1] * scale
    for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
        if m0 <= m <= m1:
            return (t0 + (t1 - t0) * (m - m0) / (m1 - m0)) * scale
    raise AssertionError("unreachable")


def elementwise_time(nbytes: float) -> float:
    return nbytes / constants()["bandwidth"]


def op_time(ops: float) -> float:
    return ops * constants()["op_overhead"]
