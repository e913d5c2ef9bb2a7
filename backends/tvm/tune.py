"""Tuning of the TVM experts GEMMs: a measured search over the schedule knobs of tir.py's kernels.

    Tuner(target, trials, rows, tasks, cache) -> tuned(kind, E, R, K, dtype) -> knobs | None
        kind "segment_gemm"  knobs {tm: token rows per tile, l2_block: bytes of weight rows kept hot,
                                    ru: weight rows per step}
        kind "gather_gemv"   knobs {chains: independent partial sums over K}
    each candidate: the PrimFunc alone, compiled for the target, timed on `rows` rows (the planned
    token count × slots) spread evenly over the experts; the fastest wins (the default schedule is
    always the first candidate, so tuning never picks a slower one than today's).

The database (DATABASE, JSON) holds one record per workload: its key (kind, E, R, K, dtype, rows,
SIMD lanes), the winning knobs, the time of each tried candidate. It goes into the artifact and into the
cache (moecc's cache dir, TVM_CACHE, keyed by target and TVM version as well), so compiling the same
shapes again measures nothing. `trials` bounds the candidates measured over the whole compile.

Why not MetaSchedule: apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.15.post2 (this venv) segfaults
serializing any node with a dtype (`tvm.ir.save_json(tirx.IntImm("int64", 3))`, ir.PrimType,
relax.ShapeExpr), which MetaSchedule's JSONDatabase, its builder pool and TuneContext all do;
`tvm.s_tir.tensor_intrin` (imported by TuneContext) takes 2-4 minutes to import on this machine, and
it needs psutil, which the venv lacks. tir.py's kernels are also loop nests, not s_tir blocks, so
MetaSchedule's rules would find nothing to tile in them.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import time

import numpy as np

log = logging.getLogger("moecc.backends.tvm.tune")

DATABASE = "tvm_tuning.json"
TVM_CACHE = "tvm_tuning.json"
FORMAT = "moecc.tvm_tuning/1"
SPACE = {
    "segment_gemm": {"tm": (4, 8, 2, 6), "l2_block": (1 << 16, 1 << 15, 1 << 17, 1 << 18), "ru": (2, 1)},
    "gather_gemv": {"chains": (None, 1, 2, 4, 8)},
}


def candidates(kind: str, K: int, lanes: int) -> list[dict]:
    """The default knobs first, then every other point of the space in a fixed shuffled order."""
    from . import tir
    space = SPACE[kind]
    points = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    if kind == "gather_gemv":                         # chains must divide K / V
        V = tir.vector_width(K, lanes)
        default = tir.chains(K, V)
        points = [{"chains": c} for c in dict.fromkeys([default] + [p["chains"] for p in points[1:]])
                  if (K // V) % c == 0]
        return points
    first, rest = points[0], points[1:]
    random.Random(0).shuffle(rest)
    return [first] + rest


def workload(kind: str, E: int, R: int, K: int, dtype: str, rows: int, lanes: int) -> str:
    return f"{kind} E={E} R={R} K={K} {dtype} rows={rows} lanes={lanes}"


class Tuner:
    """tuned(kind, E, R, K, dtype) -> knobs: from the database, else measured within the trial budget."""

    def __init__(self, target, trials: int, rows: int, tasks: int, cache: bool = True):
        import tvm
        from . import tir
        self.target, self.rows, self.lanes = target, max(1, int(rows)), tir.lanes_of(target)
        self.left, self.tasks_left = int(trials), max(1, int(tasks))
        self.scope = f"{target} | tvm {tvm.__version__}"
        self.records: dict[str, dict] = {}
        self.cached = self._read_cache() if cache else {}
        self.cache = cache
        self.measured = self.reused = 0
        self.untuned: set[str] = set()

    def __call__(self, kind: str, E: int, R: int, K: int, dtype: str) -> dict | None:
        key = workload(kind, E, R, K, dtype, self.rows, self.lanes)
        if key in self.records:
            return self.records[key]["knobs"]
        if key in self.cached:
            self.records[key] = self.cached[key]
            self.reused += 1
            log.info("TVM tuning: reusing the tuned schedule of %s from the cache (%s)", key, self.cache_path())
            return self.records[key]["knobs"]
        if key in self.untuned:
            return None
        allot = self.left // self.tasks_left if self.tasks_left else 0
        self.tasks_left = max(1, self.tasks_left - 1)
        if allot < 1:
            if key not in self.untuned:
                log.info("TVM tuning: no trials left for %s: default schedule", key)
            self.untuned.add(key)
            return None
        record = self._search(kind, E, R, K, dtype, allot, key)
        self.records[key] = record
        return record["knobs"]

    def _search(self, kind, E, R, K, dtype, allot, key) -> dict:
        tried = []
        points = candidates(kind, K, self.lanes)[:allot]
        bar = _bar(len(points), key)
        for knobs in points:
            ms = measure(kind, E, R, K, dtype, self.rows, self.lanes, knobs, self.target)
            tried.append({"knobs": knobs, "ms": ms})
            self.left -= 1
            self.measured += 1
            bar(ms)
        best = min(tried, key=lambda t: t["ms"])
        log.info("TVM tuning %s: %d trials, best %.3f ms (default %.3f ms) with %s",
                 key, len(tried), best["ms"], tried[0]["ms"], best["knobs"])
        return {"knobs": best["knobs"], "ms": best["ms"], "default_ms": tried[0]["ms"], "tried": tried}

    # ------------------------------------------------------------ database and cache

    def database(self) -> dict:
        return {"format": FORMAT, "scope": self.scope, "records": self.records}

    def save(self, path) -> None:
        """The artifact's database, and the cache merged with what was measured now."""
        from moecc.artifact import write_json
        write_json(path, self.database())
        if self.cache and self.measured:
            self._write_cache()

    @staticmethod
    def cache_path():
        from moecc.backends.torch.cache import cache_dir
        return cache_dir() / TVM_CACHE

    def _read_cache(self) -> dict:
        try:
            data = json.loads(self.cache_path().read_text())
        except (OSError, ValueError):
            return {}
        scoped = data.get(self.scope, {}) if isinstance(data, dict) else {}
        return {k: v for k, v in scoped.items() if isinstance(v, dict) and "knobs" in v}

    def _write_cache(self) -> None:
        from moecc.backends.torch.cache import locked
        path = self.cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked(path.with_suffix(".lock")):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    data = {}
                data.setdefault(self.scope, {}).update(self.records)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1) + "\n")
                tmp.replace(path)
        except OSError as e:
            log.warning("TVM tuning: cannot write the cache %s (%s); the artifact keeps its database", path, e)


def save_all(tuners: list[Tuner], path) -> None:
    """One artifact database for the tuners of every bucket (their records merged), each cache updated."""
    from moecc.artifact import write_json
    records = {k: v for t in tuners for k, v in t.records.items()}
    write_json(path, {"format": FORMAT, "scope": tuners[0].scope, "records": records})
    for t in tuners:
        if t.cache and t.measured:
            t._write_cache()


def _bar(total: int, label: str):
    """One tick per trial: tqdm on a terminal, else an INFO line per trial."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"tuning {label}", unit="trial", leave=False, file=sys.stderr)

        def tick(ms):
            bar.update(1)
            bar.set_postfix_str(f"{ms:.3f} ms")
            if bar.n >= total:
                bar.close()
        return tick
    count = itertools.count(1)
    return lambda ms: log.info("TVM tuning %s: trial %d/%d: %.3f ms", label, next(count), total, ms)


# ---------------------------------------------------------------- one measurement


def kernel(kind: str, E: int, R: int, K: int, dtype: str, lanes: int, knobs: dict | None):
    from . import tir
    if kind == "segment_gemm":
        return tir.segment_gemm(E, R, K, dtype, lanes, knobs)
    return tir.gather_gemv(E, R, K, 1, dtype, lanes, knobs)


def arguments(kind: str, E: int, R: int, K: int, dtype: str, rows: int) -> list[np.ndarray]:
    """Inputs of the standalone kernel: `rows` rows, spread evenly over the experts."""
    from .runtime import np_dtype
    dt = np_dtype(dtype)
    src = np.full((rows, K), 0.5, dtype=dt)
    w, b = np.full((E, R, K), 0.25, dtype=dt), np.zeros((E, R), dtype=dt)
    out = np.zeros((rows, R), dtype=dt)
    expert = np.arange(rows, dtype=np.int64) * E // rows                     # sorted, even segments
    if kind == "gather_gemv":
        return [src, expert, w, b, out]
    counts = np.bincount(expert, minlength=E).astype(np.int64)
    rowids = np.arange(rows, dtype=np.int64)
    return [src, rowids, rowids, counts, np.cumsum(counts), w, b, out]


def measure(kind, E, R, K, dtype, rows, lanes, knobs, target, min_ms: float = 30.0) -> float:
    """Median ms of the kernel with these knobs (compiled alone for the target)."""
    import tvm
    func = kernel(kind, E, R, K, dtype, lanes, knobs).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arguments(kind, E, R, K, dtype, rows)]
    t0 = time.perf_counter()
    lib["main"](*args)                                                       # warm up (and page in)
    once = time.perf_counter() - t0
    number = min(100, max(1, int(min_ms / 1e3 / max(once, 1e-6))))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(number):
            lib["main"](*args)
        times.append((time.perf_counter() - t0) / number)
    return 1e3 * float(np.median(times))
