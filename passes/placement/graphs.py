"""The expert graphs of a trace: load, co-activation within a layer, flow between consecutive layers.

    load  w[e]          tokens routed to expert e                                    [E]
    coact C[e, f]       tokens choosing both e and f in this layer, / (k - 1)         [E, E], C[e, e] = 0
    flow  X[e, f]       tokens choosing e in layer l-1 and f in layer l, / k          [E, E]

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
    w = trace.load()
    coact = np.zeros((L, E, E), dtype=np.float32)
    flow = np.zeros((L, E, E), dtype=np.float32)
    c_keep, f_keep = _sample(T, coact_tokens), _sample(T, flow_tokens)
    for l in range(L):
        coact[l] = layer_graph(ids[l, c_keep], None, E)[1] * (T / len(c_keep))
        if l:
            flow[l] = pair_counts(ids[l - 1, f_keep], ids[l, f_keep], E) * (T / len(f_keep) / ids.shape[2])
    return w, coact, flow


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
