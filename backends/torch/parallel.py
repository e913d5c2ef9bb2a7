"""Experts in parallel: whole experts on N threads, one intra-op thread each.

    groups = balance(costs, parts)              [[i, ...], ...] by longest-processing-time first
    results = run_groups(fn, groups)            fn(group) on every group at once; main thread too
    with section(): ...                         a whole MoE op (routing, sort, gathers, combine) at ONE
                                                intra-op thread on the caller's thread, its experts on
                                                threads() workers; threads(): the op's thread count

With N intra-op threads, BLAS splits every expert's GEMM N ways; for the small GEMMs of MoE
(tens of tokens per expert, or one at decode, where MKL's gemv stays single-threaded) that leaves
cores idle or synchronizing. Measured with 2 threads: decode GEMVs run on one core while a plain
sum streams on two (1.5x the limit), fine-grained experts at 64-512 tokens lose 1.4-1.5x to
onnxruntime, which splits by expert. PyTorch ops release the GIL, so Python threads each running
their experts with `torch.set_num_threads(1)` compute concurrently; outputs go to disjoint buffers.
Grad mode and inference mode are thread-local: the workers run under the caller's inference mode,
else under no_grad (the kernels are inference-only; the op's backward recomputes the reference).
With one intra-op thread nothing here runs (kernels.py calls the work directly).

Why a section: libgomp's pool threads spin after every parallel region (GOMP_SPINCOUNT, unless
OMP_WAIT_POLICY=passive) for a while before they sleep. An op that ran its routing and sorting as
2-thread ATen ops and then its experts on 2 workers had the workers compete with a spinning pool
thread: measured on the 2-core machine, MoEfied MiniLM layer (E=8, k=2) at T=512: 2 threads 2.07 ms,
1 thread 1.89 (cpu use 2.0: one core spinning); with OMP_WAIT_POLICY=passive 1.56. Inside a section no
parallel region runs on the caller's thread, so no pool thread is woken to spin.
"""
from __future__ import annotations

import concurrent.futures
import threading
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_workers = 0
_sections = 0                  # callers inside run_groups now (any thread)
_base_threads = 0              # the process's intra-op thread count when the first of them entered
_local = threading.local()     # .base: inside a section, the op's thread count (its caller runs at 1)


def _worker_init() -> None:
    torch.set_num_threads(1)                           # this thread's OpenMP team: 1


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool with at least `workers` threads. A smaller one is replaced but never shut down under a
    caller still using it (its threads end when the last reference to it goes)."""
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers < workers:
            _pool = concurrent.futures.ThreadPoolExecutor(workers, "moecc-experts", initializer=_worker_init)
            _pool_workers = workers
        return _pool


def _enter() -> int:
    """The process's intra-op thread count, as it was before any caller lowered it to 1."""
    global _sections, _base_threads
    with _lock:
        if _sections == 0:
            _base_threads = torch.get_num_threads()
        _sections += 1
        return _base_threads


def _leave(threads: int) -> None:
    """Every caller restores the count it found before any section (never a lowered one), so two
    callers interleaving cannot leave the process at 1 thread."""
    global _sections
    with _lock:
        _sections -= 1
        torch.set_num_threads(threads)


def balance(costs: list[float], parts: int) -> list[list[int]]:
    """Indices of `costs` in `parts` groups of near-equal total (largest first to the lightest group)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += costs[i]
    return [g for g in groups if g]


def threads() -> int:
    """The intra-op threads this MoE op has: inside `section()` the count before it, else torch's."""
    return getattr(_local, "base", 0) or torch.get_num_threads()


@contextmanager
def section():
    """A MoE op's body with N > 1 intra-op threads: the caller's thread at one intra-op thread (no
    parallel region, no spinning pool thread), `threads()` = N for the kernels' run_groups."""
    if getattr(_local, "base", 0) or torch.get_num_threads() == 1:
        yield
        return
    base = _enter()
    _local.base = base
    try:
        torch.set_num_threads(1)
        yield
    finally:
        _local.base = 0
        _leave(base)


def run_groups(fn, groups: list) -> list:
    """fn(group) for every group concurrently (the caller's thread takes the first), each with
    one intra-op thread; the caller's thread count is restored afterwards. Every future is awaited
    before an exception (the first one) propagates."""
    if len(groups) <= 1:
        return [fn(g) for g in groups]
    inference = torch.is_inference_mode_enabled()

    def job(group):
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(group)
    with section():                        # (already at one thread inside a section)
        futures = [_executor(len(groups) - 1).submit(job, g) for g in groups[1:]]
        try:
            first = fn(groups[0])
        finally:
            concurrent.futures.wait(futures)
        return [first] + [f.result() for f in futures]
