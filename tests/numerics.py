"""One shared numerical check for every test layer (eager vs transformed vs backend).

NaN/Inf-safe: `not (err <= tol)` is the failure test, so a NaN error fails; a non-finite value passes
only where the expected value is the same non-finite value.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def assert_numerically_equal(actual, expected, atol: float = 1e-5, rtol: float = 1e-5, what: str = ""):
    """Tensors/arrays (or lists of them) equal within atol + rtol·|expected|, with a useful message."""
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_numerically_equal(a, e, atol, rtol, f"{what}[{i}]")
        return
    a, e = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        bad = ~(same | (err <= atol + rtol * np.abs(e)))
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements differ "
                           f"({int((~np.isfinite(a) & bad).sum())} not finite); max abs err "
                           f"{np.nanmax(np.where(bad, err, 0.0)) if bad.any() else 0:.3e} (atol {atol}, rtol {rtol})")
