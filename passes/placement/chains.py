"""Chains of expert clusters through the layers (networkx), so that a token's clusters share a node.

A token keeps its meaning from layer to layer, so the cluster of experts it uses in layer l-1
hands most of its tokens to one cluster of layer l. Placing each layer on its own would put those
two clusters on different nodes as often as not, and the token's hidden state would cross nodes
between the layers. Here:

    1. the clusters of every layer (refine.communities) are vertices of a networkx.Graph, with
       their load; two clusters of consecutive layers are joined when at least `min_share` of the
       flow of each goes to / comes from the other (flow between clusters, from the tokens);
    2. the connected components are chains (a topic through the layers);
    3. chains spanning two layers or more are dealt to nodes, heaviest first, each to the node
       whose load (per layer, summed over the chain's layers) it raises least: a node's share of
       every layer stays even.

The planner pulls each copy towards its chain's node (an anchor in partition / refine); the load
caps still hold. The graph has one vertex per chained cluster and at most a few edges per vertex
(a few thousand in all for 58 layers), so networkx builds and splits it in milliseconds; the
expert-level graphs (~1.9 M edges) stay numpy.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .graphs import pair_counts


def cluster_graph(label: np.ndarray, w: np.ndarray, ids: np.ndarray,
                  min_share: float = 0.3) -> tuple[nx.Graph, np.ndarray]:
    """label [L, E] cluster label of each expert (ints in 0..E-1, e.g. refine.communities), w
    [L, E] loads, ids [L, T, k] the tokens -> (networkx.Graph over (layer, cluster) vertices, with
    an edge, `weight` = tokens, where the flow between two clusters of consecutive layers is at
    least min_share of each one's flow; load [L, E] of each cluster label). Clusters in no chain
    are left out of the graph."""
    L, E = label.shape
    k = ids.shape[2]
    load = np.bincount((np.arange(L)[:, None] * E + label).ravel(), w.ravel(), L * E).reshape(L, E)
    graph = nx.Graph()
    compact = [np.unique(row, return_inverse=True) for row in label]       # (labels, index)
    for l in range(1, L):
        (ua, ia), (ub, ib) = compact[l - 1], compact[l]
        a = np.where(ids[l - 1] < 0, -1, ia.reshape(-1)[np.maximum(ids[l - 1], 0)])   # [T, k] clusters
        b = np.where(ids[l] < 0, -1, ib.reshape(-1)[np.maximum(ids[l], 0)])
        flow = pair_counts(a, b, max(len(ua), len(ub)))[:len(ua), :len(ub)] / k
        strong = (flow >= min_share * flow.sum(1, keepdims=True)) & (
            flow >= min_share * flow.sum(0, keepdims=True)) & (flow > 0)
        src, dst = np.nonzero(strong)
        graph.add_edges_from(((l - 1, int(ua[s])), (l, int(ub[d])), {"weight": float(flow[s, d])})
                             for s, d in zip(src.tolist(), dst.tolist()))
    nx.set_node_attributes(graph, {v: float(load[v]) for v in graph}, "load")
    return graph, load


def chain_nodes(label: np.ndarray, w: np.ndarray, ids: np.ndarray, nodes: int,
                min_share: float = 0.3) -> np.ndarray:
    """-> node [L, E]: the node each expert's chain is dealt to, -1 where its cluster is in no
    chain (see the module docstring)."""
    L, E = label.shape
    graph, load = cluster_graph(label, w, ids, min_share)
    table = np.full((L, E), -1, dtype=np.int64)                            # [L, cluster label]
    chains = [np.array(sorted(c)).T for c in nx.connected_components(graph)]   # [2, size] each
    if not chains:
        return table
    per_layer = np.stack([np.bincount(lay, load[lay, c], L) for lay, c in chains])  # [chains, L]
    node_load = np.zeros((L, nodes))
    for i in np.argsort(-per_layer.sum(1), kind="stable").tolist():
        n = int(np.argmin(per_layer[i] @ node_load))  # raises the loads it shares layers with least
        node_load[:, n] += per_layer[i]
        table[chains[i][0], chains[i][1]] = n
    return np.take_along_axis(table, label, 1)
