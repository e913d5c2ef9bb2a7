"""Refuse inputs outside an artifact's recorded bounds, before any backend runs (numpy only).

    check(arrays, manifest["inputs"])   -> None, or MoeccError naming the input, what is wrong, what is allowed

Each manifest input (moecc/input_bounds.py writes them at compile time):
    {"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"],
     "dims": {"batch": {"min": 1}, "seq": {"min": 1, "max": 256, "why": "pos.weight has 256 positions"}},
     "values": {"min": 0, "max": 255, "why": "embed.weight has 256 rows"}}
A compiled kernel indexes tables with these values unchecked (TVM, ONNX Runtime gathers): an id
equal to the vocabulary size or an empty sequence would read out of bounds. This check is the only
guard, so every runtime calls it. This file works copied beside a runtime, without moecc.
"""
from __future__ import annotations

import numpy as np

try:
    from moecc.errors import MoeccError
except ImportError:   # copied next to an artifact, without moecc installed
    class MoeccError(Exception):
        """One clear line, non-zero exit."""


def check(arrays: list, specs: list[dict] | None) -> None:
    """Count, rank, static dims, dynamic dims within [min, max] and equal where named alike, and
    integer values within `values`; `specs` None or empty (an old manifest) checks nothing."""
    if not specs:
        return
    if len(arrays) != len(specs):
        raise MoeccError(f"the model takes {len(specs)} input(s) ({', '.join(s['name'] for s in specs)}), "
                         f"got {len(arrays)}")
    sizes: dict[str, tuple[int, str]] = {}
    for a, s in zip(arrays, specs):
        a = np.asarray(a)
        name, shape = s["name"], s["shape"]
        if a.ndim != len(shape):
            raise MoeccError(f"input {name}: expected {len(shape)} dims {shape}, got shape {list(a.shape)}")
        for i, (want, got) in enumerate(zip(shape, a.shape)):
            if isinstance(want, int):
                if got != want:
                    raise MoeccError(f"input {name}: dim {i} must be {want}, got shape {list(a.shape)}")
                continue
            _check_dim(name, want, got, (s.get("dims") or {}).get(want, {"min": 1}))
            if want in sizes and sizes[want][0] != got:
                raise MoeccError(f"input {name}: dim {want} is {got} but {sizes[want][1]} has {want}="
                                 f"{sizes[want][0]}; inputs sharing a dim must agree")
            sizes.setdefault(want, (got, name))
        _check_values(name, a, s.get("values"))


def _check_dim(name: str, dim: str, got: int, bound: dict) -> None:
    lo, hi = bound.get("min", 1), bound.get("max")
    if got < lo or (hi is not None and got > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        why = f" ({bound['why']})" if bound.get("why") else ""
        raise MoeccError(f"input {name}: {dim} = {got} is outside {allowed}{why}")


def _check_values(name: str, a: np.ndarray, bound: dict | None) -> None:
    if not bound or a.size == 0:
        return
    if a.dtype.kind not in "iub":
        raise MoeccError(f"input {name}: expected integer ids, got {a.dtype}")
    lo, hi = bound.get("min", 0), bound.get("max")
    bad = (a < lo) | (a > hi) if hi is not None else (a < lo)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        why = f" ({bound['why']})" if bound.get("why") else ""
        raise MoeccError(f"input {name}: value {a[where]} at {list(where)} is outside {lo}..{hi}{why}; "
                         f"{int(bad.sum())} value(s) out of range")
