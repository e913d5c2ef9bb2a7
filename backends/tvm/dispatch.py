"""Run-time kernel choice by token count for TVM artifacts: one library per token bucket, picked per call.

    segments(program, options) -> [(lo, below), ...]    the union of every layer's bucket boundaries
        (backends/buckets.py: cheapest kernel per power-of-two token count by kernels.py's costs);
        [] when one library serves: a forced kernel, a planned token count, or one kernel everywhere
    token_dims(program, mod) -> [[input, axis], ...]    the user-input dims whose product is the experts'
        token count T (batch × sequence), or None when T is no such product (then: one library)
    layer_choices(per_segment, bounds) -> [KernelChoice] "tvm.by_tokens:tvm.gather@8:tvm.grouped_gemm"

DIR/tvm_meta.json "dispatch": {"tokens": [[0, 1]], "libraries": [{"below": 8, "library": "model.below8.so"},
{"below": null, "library": "model.so"}]}; runtime.py computes T from the inputs' shapes and runs the first
library with T < below (all share params.npz: the same program, so main takes the same weights).
"""
from __future__ import annotations

import math

import torch

from moecc.backends.base import KernelChoice
from moecc.spec import MoESpec

from .. import buckets
from . import kernels

BY_TOKENS = "tvm.by_tokens"


def experts_nodes(program) -> list:
    from .lower import EXPERTS_KEY
    return [n for n in program.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "") == EXPERTS_KEY]


def segments(program, options: dict) -> list[tuple[int, int | None]]:
    from .lower import op_args
    if options.get("tokens") or options.get("kernel") or options.get("kernels") or options.get("dispatch") is False:
        return []
    bounds: set[int] = set()
    for node in experts_nodes(program):
        spec = MoESpec.from_json(op_args(node)["spec"])
        val = node.args[0].meta.get("val")
        shapes = {"dtype": str(val.dtype).removeprefix("torch.") if val is not None else "float32"}
        names = [n for n, k in kernels.KERNELS.items() if k.checker(spec, shapes) is True]
        if names:
            plan = buckets.plan(names, lambda n, T, spec=spec: kernels.KERNELS[n].cost(spec, T))
            bounds |= {T for _, T in plan if T is not None}
    if not bounds:
        return []
    edges = sorted(bounds)
    return list(zip([1] + edges, edges + [None]))


def token_dims(program, mod, inputs: list[dict]) -> list[list[int]] | None:
    """[[input index, axis], ...] whose sizes multiply to every experts node's token count."""
    nodes = experts_nodes(program)
    where = {}
    for i, spec in enumerate(inputs):
        for axis, d in enumerate(spec["shape"]):
            if isinstance(d, str):
                where.setdefault(d, [i, axis])
    found = None
    for node in nodes:
        val = node.args[0].meta.get("val")
        if val is None:
            return None
        dims = []
        for d in val.shape[:-1]:
            if isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.expr.is_number):
                if int(d) != 1:
                    return None                      # a static factor: T is not a product of input dims
                continue
            symbols = d.node.expr.free_symbols
            if len(symbols) != 1 or d.node.expr != next(iter(symbols)):
                return None
            name = str(next(iter(symbols)))
            if name not in where:
                return None
            dims.append(where[name])
        if found is not None and dims != found:
            return None
        found = dims
    return found or None


def layer_choices(per_segment: list[list[KernelChoice]], segs: list[tuple[int, int | None]]) -> list[KernelChoice]:
    """One KernelChoice per layer naming its kernel per bucket (equal neighbours merged)."""
    out = []
    for i, first in enumerate(per_segment[0]):
        plan: list[tuple[str, int | None]] = []
        for seg_choices, (_, below) in zip(per_segment, segs):
            k = seg_choices[i].kernel
            if plan and plan[-1][0] == k:
                plan[-1] = (k, below)
            else:
                plan.append((k, below))
        if len(plan) == 1:
            out.append(first)
            continue
        lows = buckets.lows(plan)
        where = ", ".join(f"{k} for {a} ≤ T < {T}" if T else f"{k} from T = {a} on" for (k, T), a in zip(plan, lows))
        out.append(KernelChoice(first.layer, buckets.encode(BY_TOKENS, plan),
                                f"run-time dispatch on the token count T (one library per bucket; cheapest per "
                                f"power-of-two bucket by the cost model): {where}",
                                {n: "costlier in every token bucket" for n in kernels.KERNELS
                                 if n not in {k for k, _ in plan}}))
    return out


def library_name(below: int | None, default: str) -> str:
    return default if below is None else f"model.below{below}.so"


def tune_tokens(lo: int, below: int | None) -> int:
    """Where a bucket's GEMMs are tuned: its geometric middle (the open last bucket: at least 512)."""
    return max(lo, 512) if below is None else max(1, int(math.sqrt(lo * (below - 1))))
