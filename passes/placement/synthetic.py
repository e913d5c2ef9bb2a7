"""Synthetic routing traces: skewed expert popularity that drifts between windows, and co-activation.

Each token has a latent topic that it keeps through all layers (real tokens keep their meaning); in
every layer each topic favours a random set of experts. Per layer l, window w, token t of topic z:

    logits[t, e] = popularity[l, w, e] + affinity * [e in favoured(l, z)] + Gumbel noise     # [T, E]
    experts      = top-k(logits)   (Gumbel top-k = sampling k experts without replacement)
    weights      = softmax of the noise-free logits over the chosen experts

popularity[l, 0] ~ N(0, skew²) and drifts by N(0, drift²) per window, so the hot experts of window i
are only partly the hot experts of window i+1. The favoured sets are consecutive runs of a random
permutation of the experts, `favoured` long (default E / topics: disjoint clusters); `affinity=0`
removes all co-activation structure. `groups` > 1 adds DeepSeek-style group-limited routing: only
the `topk_groups` groups with the best top-2 scores may be chosen.
"""
from __future__ import annotations

import numpy as np

from .trace import Trace


def synthetic_trace(layers: int = 8, experts: int = 64, top_k: int = 4, tokens: int = 1024,
                    windows: int = 3, topics: int = 16, skew: float = 1.0, drift: float = 0.3,
                    affinity: float = 3.0, favoured: int | None = None, groups: int = 1,
                    topk_groups: int | None = None, seed: int = 0) -> Trace:
    """A trace of `tokens` tokens per window over `windows` windows (tokens in window order)."""
    rng = np.random.default_rng(seed)
    T = tokens * windows
    favoured = favoured or max(top_k, experts // max(topics, 1))
    window = np.repeat(np.arange(windows), tokens)                          # [T]
    topic = rng.integers(0, max(topics, 1), size=T)                         # [T]
    ids = np.empty((layers, T, top_k), dtype=np.int32)
    weights = np.empty((layers, T, top_k), dtype=np.float32)
    for layer in range(layers):
        steps = rng.normal(0.0, drift, size=(windows, experts))
        steps[0] = rng.normal(0.0, skew, size=experts)
        popularity = np.cumsum(steps, axis=0)                               # [W, E]
        boost = np.zeros((max(topics, 1), experts))                         # [Z, E]
        if topics and affinity:     # topic z favours experts perm[z*f : z*f + f] (wrapping around)
            perm = rng.permutation(experts)
            chosen = perm[(np.arange(topics)[:, None] * favoured + np.arange(favoured)) % experts]
            np.put_along_axis(boost, chosen, affinity, axis=1)
        logits = popularity[window] + boost[topic]                          # [T, E]
        noisy = logits + rng.gumbel(size=logits.shape)
        if groups > 1:
            noisy = _group_limit(noisy, groups, topk_groups or max(1, groups // 2))
        top = np.argpartition(-noisy, top_k - 1, axis=1)[:, :top_k]         # [T, k]
        order = np.argsort(-np.take_along_axis(noisy, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        chosen_logits = np.take_along_axis(logits, top, 1)
        p = np.exp(chosen_logits - chosen_logits.max(1, keepdims=True))
        ids[layer] = top
        weights[layer] = p / p.sum(1, keepdims=True)
    names = tuple(f"layers.{i}.moe" for i in range(layers))
    return Trace(ids, weights, window, experts, names)


def _group_limit(scores: np.ndarray, groups: int, keep: int) -> np.ndarray:
    """[T, E] -> [T, E] with every expert outside the `keep` best groups set to -inf."""
    T, E = scores.shape
    by_group = scores.reshape(T, groups, E // groups)
    top2 = np.sort(by_group, axis=2)[:, :, -2:].sum(2)                      # [T, groups]
    best = np.argpartition(-top2, keep - 1, axis=1)[:, :keep]
    mask = np.full((T, groups), -np.inf)
    np.put_along_axis(mask, best, 0.0, axis=1)
    return (by_group + mask[:, :, None]).reshape(T, E)
