"""The expert graphs of a trace: load, co-activation within a layer, flow between consecutive layers.

    load  w[e]          tokens routed to expert e                                    [E]
    coact C[e, f]       tokens choosing both e and f in this layer, / (k - 1)         [E, E], C[e, e] = 0
    flow  X[e, f]       tokens choosing e in layer l-1 and f in layer l, / k          [E, E]
                        (the planner uses it factored: token_parts)

With these normalizations every row of C and every column of X sums to the expert's load, so
co-activation and flow weigh in the same unit (tokens). `layer_graph` returns the dense weighted
adjacency the planner partitions; `expert_graph` builds the same graph as a networkx.Graph (vertices
(layer, expert) with a `load` attribute, edges with `weight` and `kind` = "coact" | "flow") to look
at, export, or feed other networkx algorithms.
"""
from __future__ import annotations

import numpy as np

from .trace import Trace


def pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, ka], [T, kb] -> [E, E]: sum over tokens t and slots i, j of [a[t,i] = e][b[t,j] = f]
    (dropped choices, -1, count nowhere)."""
    E = num_experts + 1                                     # -1 -> the extra last row / column
    a, b = np.where(a < 0, E - 1, a).astype(np.int64), np.where(b < 0, E - 1, b)
    idx = (a[:, :, None] * E + b[:, None, :]).ravel()
    return np.bincount(idx, minlength=E * E).reshape(E, E)[:-1, :-1].astype(np.float64)


def layer_graph(ids: np.ndarray, prev_ids: np.ndarray | None,
                num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ids [T, k] of this layer (prev_ids [T, k] of the previous one, or None) -> (w, C, X or None)."""
    E, k = num_experts, ids.shape[1]
    w = np.bincount(ids[ids >= 0], minlength=E).astype(np.float64)
    i, j = np.triu_indices(k, 1)                # slot pairs i < j (top-k experts are distinct)
    upper = pair_counts(ids[:, i].reshape(-1, 1), ids[:, j].reshape(-1, 1), E)
    coact = (upper + upper.T) / max(k - 1, 1)
    flow = None if prev_ids is None else pair_counts(prev_ids, ids, E) / prev_ids.shape[1]
    return w, coact, flow


def model_graph(trace: Trace, coact_tokens: int | None = None,
                flow_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All layers: w [L, E], coact [L, E, E], flow [L, E, E] (flow[l] from layer l-1 to l; flow[0]
    is zero). Edges may be estimated from an evenly spaced sample of at most `coact_tokens` /
    `flow_tokens` tokens, rescaled to the whole trace; loads always count every token."""
    L, E, T = trace.num_layers, trace.num_experts, trace.num_tokens
    ids = trace.expert_ids
    flow = np.zeros((L, E, E), dtype=np.float32)
    f_keep = _sample(T, flow_tokens)
    for l in range(1, L):
        flow[l] = pair_counts(ids[l - 1, f_keep], ids[l, f_keep], E) * (T / len(f_keep) / ids.shape[2])
    return trace.load(), coactivation(trace, coact_tokens), flow


def coactivation(trace: Trace, tokens: int | None = None) -> np.ndarray:
    """coact [L, E, E] float32 (see the module docstring), from an evenly spaced sample of at
    most `tokens` tokens, rescaled to the whole trace."""
    L, E, T = trace.num_layers, trace.num_experts, trace.num_tokens
    keep = _sample(T, tokens)
    scale = np.float32(T / len(keep) / max(trace.top_k - 1, 1))
    coact = np.empty((L, E, E), dtype=np.float32)
    dropped = bool((trace.expert_ids < 0).any())
    F = E + dropped                                 # -1 -> an extra last row / column
    for l in range(L):
        x = trace.expert_ids[l, keep].astype(np.int64)
        if dropped:
            x[x < 0] = E
        counts = np.bincount((x[:, :, None] * F + x[:, None, :]).ravel(), minlength=F * F)
        coact[l] = counts.reshape(F, F)[:E, :E]     # both orders of every pair of slots
    diag = np.arange(E)
    coact[:, diag, diag] = 0.0                      # (a slot paired with itself)
    coact *= scale
    return coact


def token_parts(ids: np.ndarray, member: np.ndarray) -> np.ndarray:
    """ids [L, T, k] (-1 = dropped), member [L, E, P] (share of expert e in part p) -> [L, T, P]:
    how much of each token's k choices each part holds. The flow edges in factored form: the
    flow-weighted agreement of layers l-1 and l, member[l-1]^T X[l] member[l], is
    U[l-1]^T U[l] / k, with no [E, E] matrix."""
    L, E, P = member.shape
    padded = np.concatenate([member, np.zeros((L, 1, P), member.dtype)], 1).astype(
        np.float32, copy=False)                                             # -1 -> zero row
    idx = np.where(ids < 0, E, ids)
    return padded[np.arange(L)[:, None, None], idx].sum(2)


def _sample(tokens: int, most: int | None) -> np.ndarray:
    """Indices of at most `most` evenly spaced tokens (all when most is None or larger)."""
    if most is None or most >= tokens:
        return np.arange(tokens)
    return np.linspace(0, tokens - 1, most).astype(np.int64)


def expert_graph(trace: Trace, layers: list[int] | None = None, min_weight: float = 0.0):
    """networkx.Graph over vertices (layer, expert) of the chosen layers (default all): loads,
    co-activation edges within each layer and flow edges between consecutive chosen layers, keeping
    edges heavier than `min_weight` tokens."""
    import networkx as nx

    layers = list(range(trace.num_layers)) if layers is None else sorted(layers)
    graph = nx.Graph()
    for pos, layer in enumerate(layers):
        prev = layers[pos - 1] if pos and layers[pos - 1] == layer - 1 else None
        w, coact, flow = layer_graph(trace.expert_ids[layer],
                                     None if prev is None else trace.expert_ids[prev],
                                     trace.num_experts)
        graph.add_nodes_from(((layer, e), {"load": float(w[e])}) for e in range(trace.num_experts))
        edges = [(np.triu(coact, 1), layer, "coact")] + ([] if flow is None else [(flow, prev, "flow")])
        for matrix, src_layer, kind in edges:
            src, dst = np.nonzero(matrix > min_weight)
            graph.add_edges_from(((src_layer, int(e)), (layer, int(f)),
                                  {"weight": float(matrix[e, f]), "kind": kind})
                                 for e, f in zip(src.tolist(), dst.tolist()))
    return graph


def token_counts(ids: np.ndarray, part_of: np.ndarray, parts: int) -> np.ndarray:
    """ids [L, T, k] (-1 = dropped), part_of [L, E] one part per expert -> [L, T, parts] float32:
    how many of each token's k choices each part holds (token_parts for one-copy experts)."""
    L, T, k = ids.shape
    E = part_of.shape[1]
    part = np.concatenate([part_of, np.full((L, 1), parts)], 1)             # -1 -> a spare part
    flat = np.where(ids < 0, E, ids).reshape(L, -1) + (np.arange(L) * (E + 1))[:, None]
    idx = part.ravel()[flat] + (np.arange(L * T) * (parts + 1)).reshape(L, T, 1).repeat(k, 2).reshape(L, -1)
    counts = np.bincount(idx.ravel(), minlength=L * T * (parts + 1))
    return counts.reshape(L, T, parts + 1)[:, :, :parts].astype(np.float32)


PHI = (5 ** 0.5 - 1) / 2


def token_hash(tokens: np.ndarray) -> np.ndarray:
    """[T] token indices -> [T] u_t = frac((t + 1) * golden ratio) in [0, 1): where each token
    falls in the cumulative shares of an expert's copies (metrics.dispatch)."""
    return np.modf((tokens + 1) * PHI)[0]


def token_node(nodes: np.ndarray, N: int, before: np.ndarray) -> np.ndarray:
    """nodes [T, k] of a token's choices in rank order (-1: dropped) -> [T] the node holding most
    of them (ties: the best-ranked choice's), `before` where all were dropped."""
    T, k = nodes.shape
    rows = np.arange(T)
    kept = nodes >= 0
    best = nodes[rows, np.argmax(kept, axis=1)]                             # best-ranked kept
    votes = 2 * np.bincount((rows[:, None] * N + nodes)[kept], minlength=T * N).reshape(T, N)
    votes[rows, np.maximum(best, 0)] += best >= 0
    return np.where(kept.any(1), votes.argmax(1), before)
