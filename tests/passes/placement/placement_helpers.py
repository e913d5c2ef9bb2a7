"""Small hand-made traces for the placement tests."""
import numpy as np

from moecc.passes.placement.trace import Trace


def trace_of(ids, num_experts, windows=None, weights=None) -> Trace:
    """ids [L, T, k] (nested lists ok) -> Trace; windows [T] (default: all window 0)."""
    ids = np.asarray(ids)
    w = np.full(ids.shape, 1.0 / ids.shape[2]) if weights is None else weights
    window = np.zeros(ids.shape[1], dtype=np.int64) if windows is None else windows
    return Trace(ids, w, window, num_experts)


def random_trace(rng, layers, experts, k, tokens, windows=2, skew=1.0) -> Trace:
    """Skewed random routing: top-k of Gumbel-perturbed log-normal popularity."""
    pop = rng.normal(0, skew, size=(layers, 1, experts))
    scores = pop + rng.gumbel(size=(layers, tokens, experts))
    ids = np.argsort(-scores, axis=2)[:, :, :k]
    window = np.arange(tokens) * windows // tokens
    return Trace(ids, np.full(ids.shape, 1.0 / k), window, experts)
