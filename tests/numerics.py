"""One shared numerical check for every test layer (eager vs transformed vs backend)."""
from __future__ import annotations

import numpy as np
import torch


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_numerically_equal(actual, expected, atol: float = 1e-5, rtol: float = 1e-5, what: str = ""):
    """Tensors/arrays (or lists of them) equal within atol + rtol·|expected|, with a useful message."""
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_numerically_equal(a, e, atol, rtol, f"{what}[{i}]")
        return
    a, e = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    err = np.abs(a - e)
    bad = err > atol + rtol * np.abs(e)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements differ; "
                           f"max abs err {err.max():.3e} (atol {atol}, rtol {rtol})")
