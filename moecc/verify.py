"""Numerical verification: a backend's outputs against the PyTorch reference, on several input sets.

NaN/Inf-safe: an output that is not finite where the reference is (or differs from the reference's own
non-finite value) is a failure with max abs error = inf; it can never read as "max abs 0".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Check:
    label: str                 # "example", "fresh" or "perturbed"
    shapes: list               # input shapes
    max_abs: float
    max_rel: float             # max_abs / max |reference|
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _error(r64: np.ndarray, g64: np.ndarray) -> tuple[float, float]:
    """(max abs error, max |finite reference|); a non-finite mismatch is an infinite error."""
    same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))            # equal, incl. equal inf / both nan
    finite = np.isfinite(r64) & np.isfinite(g64)
    if not np.all(same | finite):
        err = float("inf")
    else:
        diff = np.where(finite, np.abs(r64 - g64), 0.0)
        err = float(np.max(diff, initial=0.0))
    scale = float(np.max(np.abs(np.where(np.isfinite(r64), r64, 0.0)), initial=0.0))
    return err, scale


def compare(reference: list[np.ndarray], got: list[np.ndarray], tol: float) -> tuple[float, float, bool]:
    if len(reference) != len(got):
        return float("inf"), float("inf"), False
    max_abs, scale = 0.0, 0.0
    for r, g in zip(reference, got):
        if r.shape != g.shape:
            return float("inf"), float("inf"), False
        err, s = _error(np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64))
        max_abs, scale = max(max_abs, err), max(scale, s)
    rel = max_abs / max(scale, 1e-30)
    return max_abs, rel, bool(max_abs <= tol * max(1.0, scale))


def verify(run, reference, input_sets: list[tuple[str, list[np.ndarray]]], tol: float) -> list[Check]:
    """`run` and `reference` map a list of numpy inputs to a list of numpy outputs."""
    checks = []
    for label, inputs in input_sets:
        a, r, ok = compare(reference(inputs), run(inputs), tol)
        checks.append(Check(label, [list(x.shape) for x in inputs], a, r, ok))
    return checks


def summary(checks: list[Check]) -> str:
    return "; ".join(f"{c.label} {c.shapes}: max abs {c.max_abs:.2e}, rel {c.max_rel:.2e}" for c in checks)
