"""Numerical verification: a backend's outputs against the PyTorch reference, on several input sets."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Check:
    label: str                 # "example" or "fresh"
    shapes: list               # input shapes
    max_abs: float
    max_rel: float             # max_abs / max |reference|
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[np.ndarray], got: list[np.ndarray], tol: float) -> tuple[float, float, bool]:
    if len(reference) != len(got):
        return float("inf"), float("inf"), False
    max_abs, scale = 0.0, 0.0
    for r, g in zip(reference, got):
        if r.shape != g.shape:
            return float("inf"), float("inf"), False
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        max_abs = max(max_abs, float(np.max(np.abs(r64 - g64), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(r64), initial=0.0)))
    rel = max_abs / max(scale, 1e-30)
    return max_abs, rel, max_abs <= tol * max(1.0, scale)


def verify(run, reference, input_sets: list[tuple[str, list[np.ndarray]]], tol: float) -> list[Check]:
    """`run` and `reference` map a list of numpy inputs to a list of numpy outputs."""
    checks = []
    for label, inputs in input_sets:
        a, r, ok = compare(reference(inputs), run(inputs), tol)
        checks.append(Check(label, [list(x.shape) for x in inputs], a, r, ok))
    return checks


def summary(checks: list[Check]) -> str:
    return "; ".join(f"{c.label} {c.shapes}: max abs {c.max_abs:.2e}, rel {c.max_rel:.2e}" for c in checks)
