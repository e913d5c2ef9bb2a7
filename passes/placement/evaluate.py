"""Honest comparison of placement methods: plan on window i, score on window i+1, for every i.

    evaluate(trace, topology, ["eplb", "graph"], replicas=32) -> {method: Metrics}

Counts and times are summed over the scored windows, balancedness and planning time averaged.
Methods that place no replicas (the baselines) get replicas=0.
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

from .metrics import COUNTS, Metrics, score
from .plan import plan
from .topology import Topology
from .trace import Trace

NO_REPLICAS = ("contiguous", "round_robin")


def window_pairs(trace: Trace, in_sample: bool = False) -> list[tuple[Trace, Trace]]:
    """(planned-on, scored-on) windows: consecutive windows, or each window with itself."""
    windows = [trace.select(w) for w in trace.windows()]
    if in_sample:
        return [(w, w) for w in windows]
    if len(windows) < 2:
        raise MoeccError(f"scoring needs a trace with at least 2 windows (plan on one, score on the "
                         f"next); this one has {len(windows)}")
    return list(zip(windows[:-1], windows[1:]))


def evaluate(trace: Trace, topology: Topology, methods, replicas: int = 0, token_bytes: int = 8192,
             options: dict | None = None, in_sample: bool = False) -> dict[str, Metrics]:
    """{label: Metrics aggregated over window pairs}. methods: method names, or {label: method}
    to run one method twice under different labels; options = {label: extra keyword args}."""
    pairs = window_pairs(trace, in_sample)
    labels = methods if isinstance(methods, dict) else {m: m for m in methods}
    results = {}
    for label, method in labels.items():
        r = 0 if method in NO_REPLICAS else replicas
        scores = [score(plan(past, topology, method, r, **(options or {}).get(label, {})), future,
                        token_bytes) for past, future in pairs]
        results[label] = aggregate(scores)
    return results


def aggregate(scores: list[Metrics]) -> Metrics:
    sums = {name: sum(getattr(s, name) for s in scores) for name in COUNTS + ("tokens",)}
    return Metrics(balancedness=float(np.mean([s.balancedness for s in scores])),
                   a2a_ms=float(sum(s.a2a_ms for s in scores)),
                   planning_s=float(np.mean([s.planning_s for s in scores])), **sums)
