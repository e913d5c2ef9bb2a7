"""Per-rank timelines of compute and communication intervals, the overlap fraction, and Chrome /
Perfetto trace JSON (chrome://tracing, ui.perfetto.dev: one process per rank, thread 0 = compute,
thread 1 = communication).

    tl = Timeline(rank)
    with tl.span("compute", "experts[0]"): ...     # or tl.add("comm", "dispatch[0]", t0, t1)
    tl.overlap() -> {"comm": s, "compute": s, "hidden": s, "fraction": hidden / comm}
    write_chrome_trace([tl0, tl1, ...], "trace.json")

Overlap fraction = hidden communication time / total communication time, by interval union: the
length of union(comm) ∩ union(compute) over the length of union(comm). Clock: time.perf_counter
(CLOCK_MONOTONIC on Linux: one clock for every process on the machine, so ranks line up).
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from moecc.distributed.costmodel import intersection, union

KINDS = ("compute", "comm")


class Timeline:
    """Intervals (kind, name, t0, t1) of one rank; thread-safe (the comm worker records too)."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.events: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, name: str, t0: float, t1: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"timeline kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            self.events.append((kind, name, t0, t1))

    @contextmanager
    def span(self, kind: str, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, name, t0, time.perf_counter())

    def clear(self) -> None:
        with self._lock:
            self.events.clear()

    def intervals(self, kind: str) -> list[tuple[float, float]]:
        return [(a, b) for k, _, a, b in self.events if k == kind]

    def overlap(self) -> dict[str, float]:
        comm, comp = self.intervals("comm"), self.intervals("compute")
        c = sum(b - a for a, b in union(comm))
        hidden = intersection(comm, comp)
        return {"comm": c, "compute": sum(b - a for a, b in union(comp)), "hidden": hidden,
                "fraction": hidden / c if c > 0 else 1.0}

    def to_dict(self) -> dict:
        return {"rank": self.rank, "events": [list(e) for e in self.events]}

    @staticmethod
    def from_dict(d: dict) -> "Timeline":
        tl = Timeline(int(d["rank"]))
        tl.events = [(str(k), str(n), float(a), float(b)) for k, n, a, b in d["events"]]
        return tl


def chrome_events(timelines: list[Timeline]) -> list[dict]:
    """Complete ('X') events in microseconds from the earliest interval of any rank."""
    starts = [a for tl in timelines for _, _, a, _ in tl.events]
    origin = min(starts) if starts else 0.0
    out = []
    for tl in timelines:
        out.append({"name": "process_name", "ph": "M", "pid": tl.rank, "args": {"name": f"rank {tl.rank}"}})
        for tid, kind in enumerate(KINDS):
            out.append({"name": "thread_name", "ph": "M", "pid": tl.rank, "tid": tid, "args": {"name": kind}})
        for kind, name, a, b in tl.events:
            out.append({"name": name, "cat": kind, "ph": "X", "pid": tl.rank, "tid": KINDS.index(kind),
                        "ts": (a - origin) * 1e6, "dur": (b - a) * 1e6})
    return out


def write_chrome_trace(timelines: list[Timeline], path: str | Path) -> Path:
    """Write the ranks' timelines as Chrome trace JSON, with each rank's overlap in metadata."""
    path = Path(path)
    doc = {"traceEvents": chrome_events(timelines), "displayTimeUnit": "ms",
           "metadata": {"overlap": {str(tl.rank): tl.overlap() for tl in timelines}}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return path
