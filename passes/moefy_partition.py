"""Split an FFN's intermediate neurons into E disjoint, equal-size groups (the experts of `moefy`).

    first-layer weight rows [F, D]      → balanced k-means          → labels [F] in 0..E-1
    calibration activations [T, F]      → co-activation graph (networkx, k nearest neighbours per neuron)
                                        → recursive balanced bisection (spectral split + Kernighan–Lin)
                                        → labels [F]

Group sizes are `sizes(n, E)`: as equal as possible (they differ by at most one when E does not divide
n; `moefy` pads the short groups with zero neurons so every expert has the same width). Both methods
are deterministic for a given seed.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from moecc.errors import MoeccError

METHODS = ("cluster", "coactivation")


def sizes(n: int, groups: int) -> list[int]:
    """n items in `groups` groups as equal as possible, larger groups first."""
    base, extra = divmod(n, groups)
    return [base + 1 if g < extra else base for g in range(groups)]


def groups_of(labels: torch.Tensor, num: int) -> list[torch.Tensor]:
    """labels [F] -> the sorted neuron indices of each group."""
    return [torch.nonzero(labels == g).flatten() for g in range(num)]


def check(labels: torch.Tensor, n: int, num: int) -> None:
    """Every neuron in exactly one group, group sizes as `sizes` says (the partition contract)."""
    if labels.shape != (n,) or int(labels.min()) < 0 or int(labels.max()) >= num:
        raise MoeccError(f"partition: labels must be [{n}] in 0..{num - 1}")
    counts = sorted(torch.bincount(labels, minlength=num).tolist(), reverse=True)
    if counts != sizes(n, num):
        raise MoeccError(f"partition: group sizes {counts} are not balanced ({sizes(n, num)})")


def _assign(dist: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """Greedy balanced assignment: (item, group) pairs by increasing distance, groups fill to cap."""
    n, g = dist.shape
    order = torch.argsort(dist.flatten()).tolist()
    labels = [-1] * n
    left = list(caps)
    done = 0
    for flat in order:
        i, c = divmod(flat, g)
        if labels[i] < 0 and left[c] > 0:
            labels[i], left[c] = c, left[c] - 1
            done += 1
            if done == n:
                break
    return torch.tensor(labels)


def balanced_kmeans(rows: torch.Tensor, num: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """rows [F, D] -> labels [F]: k-means on unit-normalized rows with equal-size clusters."""
    x = torch.nn.functional.normalize(rows.double(), dim=1)                # [F, D]
    n = x.shape[0]
    caps = sizes(n, num)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=g)[:num]]                       # [E, D]
    labels = None
    for _ in range(iters):
        dist = torch.cdist(x, centers)                                      # [F, E]
        new = _assign(dist, caps)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.stack([x[labels == c].mean(0) for c in range(num)])
    return labels


def _knn_graph(weights: np.ndarray, nodes: list[int], neighbours: int) -> nx.Graph:
    """Undirected graph over `nodes`: each keeps its `neighbours` strongest co-activation edges."""
    sub = weights[np.ix_(nodes, nodes)]                                     # [n, n]
    np.fill_diagonal(sub, -np.inf)
    graph = nx.Graph()
    graph.add_nodes_from(nodes)
    kth = min(neighbours, len(nodes) - 1)
    top = np.argpartition(-sub, kth - 1, axis=1)[:, :kth] if kth > 0 else np.zeros((len(nodes), 0), int)
    for a, row in enumerate(top):
        for b in row:
            w = float(sub[a, b])
            if w > 0:
                u, v = nodes[a], nodes[b]
                graph.add_edge(u, v, weight=graph.get_edge_data(u, v, {"weight": 0.0})["weight"] + w)
    return graph


def _bisect(weights: np.ndarray, nodes: list[int], left: int, neighbours: int, seed: int):
    """Split `nodes` into parts of `left` and len-left nodes: spectral order, then Kernighan–Lin."""
    sub = weights[np.ix_(nodes, nodes)]
    lap = np.diag(sub.sum(1)) - sub
    fiedler = np.linalg.eigh(lap)[1][:, 1] if len(nodes) > 2 else np.arange(len(nodes), dtype=float)
    order = [nodes[i] for i in np.argsort(fiedler, kind="stable")]
    a, b = set(order[:left]), set(order[left:])
    graph = _knn_graph(weights, nodes, neighbours)
    # Kernighan–Lin swaps pairs of nodes, so it keeps the two parts' sizes: the balance constraint
    p, q = nx.algorithms.community.kernighan_lin_bisection(graph, partition=(a, b), max_iter=10,
                                                           weight="weight", seed=seed)
    p, q = (p, q) if len(p) == left else (q, p)        # networkx does not keep the parts' order
    return sorted(p), sorted(q)


def coactivation(active: torch.Tensor, num: int, seed: int = 0, neighbours: int = 16) -> torch.Tensor:
    """active [T, F] (how strongly each neuron fires per token, ≥ 0) -> labels [F].

    Edge weight = co-activation: the cosine of two neurons' activity over the calibration tokens."""
    a = torch.nn.functional.normalize(active.double().t(), dim=1)          # [F, T]
    weights = (a @ a.t()).clamp(min=0).numpy()                              # [F, F]
    n = weights.shape[0]
    caps = sizes(n, num)
    labels = torch.empty(n, dtype=torch.long)

    def split(nodes: list[int], groups: list[int]) -> None:
        if len(groups) == 1:
            labels[nodes] = groups[0]
            return
        half = len(groups) // 2
        left = sum(caps[g] for g in groups[:half])
        a_nodes, b_nodes = _bisect(weights, nodes, left, neighbours, seed)
        split(a_nodes, groups[:half])
        split(b_nodes, groups[half:])

    split(list(range(n)), list(range(num)))
    return labels


def partition(method: str, num: int, *, rows: torch.Tensor, active: torch.Tensor | None,
              seed: int = 0) -> torch.Tensor:
    """labels [F] by `method` (cluster: first-layer weight rows; coactivation: calibration activity)."""
    if method == "cluster":
        labels = balanced_kmeans(rows, num, seed)
    elif method == "coactivation":
        if active is None:
            raise MoeccError("moefy --method coactivation needs calibration data (--calibration)")
        labels = coactivation(active, num, seed)
    else:
        raise MoeccError(f"moefy --method {method!r}: choose one of {', '.join(METHODS)}")
    check(labels, rows.shape[0], num)
    return labels
