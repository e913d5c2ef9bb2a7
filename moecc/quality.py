"""How far the passes moved the model: the compiled graph against the model before any pass.

    quality(before, after, input_sets) -> {"against": ..., "checks": [{label, rel_error, cosine}], "text"}

Verification compares the backend with the transformed graph (did lowering keep the numbers?); this
compares the transformed graph with the user's model (what did MoEfication or a new router cost?).
rel_error = ‖after − before‖ / ‖before‖ over the first floating output; cosine = mean over its rows
(tokens / sentences) of cos(after_row, before_row). Upcycling at init gives 0 and 1.
"""
from __future__ import annotations

import numpy as np

AGAINST = "the model before the passes (dense)"


def _first_float(outputs: list[np.ndarray]) -> np.ndarray | None:
    return next((o for o in outputs if np.issubdtype(o.dtype, np.floating)), None)


def compare(before: list[np.ndarray], after: list[np.ndarray]) -> dict | None:
    b, a = _first_float(before), _first_float(after)
    if b is None or a is None or b.shape != a.shape or b.size == 0:
        return None
    b64, a64 = b.astype(np.float64).reshape(-1, b.shape[-1]), a.astype(np.float64).reshape(-1, a.shape[-1])
    rel = float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))
    cos = (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-30)
    return {"rel_error": rel, "cosine": float(cos.mean()), "worst_cosine": float(cos.min())}


def quality(before_outputs: dict, after_run, input_sets) -> dict | None:
    """`before_outputs` {label: outputs of the model before passes}; `after_run(inputs) -> outputs`."""
    checks = []
    for label, inputs in input_sets:
        c = compare(before_outputs[label], after_run(inputs))
        if c is not None:
            checks.append(dict(label=label, **c))
    if not checks:
        return None
    text = "; ".join(f"{c['label']}: rel error {c['rel_error']:.3g}, cosine {c['cosine']:.4f}" for c in checks)
    return {"against": AGAINST, "checks": checks, "text": text}
