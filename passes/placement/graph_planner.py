"""moecc's placement: partition the expert graphs so that tokens cross nodes less, loads balanced.

The graphs (graphs.py), per layer: experts are vertices weighted by load, co-activation edges join
experts one token chose together, flow edges join an expert of layer l-1 to one of layer l that a
token went through in turn. All layers are partitioned at once (partition.py):

    1. nodes:    every layer's experts -> nodes by co-activation, under a node load cap
                 (1 + tol) * mean (then repaired down to (1 + final_tol) * mean) and a node slot
                 cap; node labels of layer l are renamed to follow layer l-1 (greedy matching on
                 the flow between parts); each further sweep re-partitions with the flow to the
                 parts of layers l-1 and l+1 as anchors (so a token's next experts sit where its
                 last ones were) and renames again;
    2. replicas: every extra copy goes to the expert with the largest load per copy whose node has a
                 free slot; copies stay in their expert's node, so they add no cross-node traffic;
    3. devices:  inside each node the same partition places the copies on devices (slots per device,
                 copies of one expert on different devices, same load caps per device). Edge
                 weights are scaled by device_affinity: -1 (default) spreads co-activated experts
                 over the node's devices, since their loads rise and fall together (balance); +1
                 packs them (fewer intra-node sends). Device labels then follow layer l-1.

A copy takes 1/count of its expert's tokens.
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

from .graphs import model_graph
from .partition import partition
from .topology import Topology, check_fits
from .trace import Trace


def graph_plan(trace: Trace, topology: Topology, replicas: int = 0, tol: float = 0.02,
               device_tol: float = 0.02, final_tol: float = 0.005, device_affinity: float = -1.0,
               sweeps: int = 2, spread: float = 16.0, coact_tokens: int | None = 2048,
               flow_tokens: int | None = 1024) -> np.ndarray:
    """share [L, E, D] for the trace (tol / device_tol: allowed load above the mean of a node / of
    a device in its node, as a fraction; sweeps: node partition passes; coact_tokens / flow_tokens:
    estimate edges from at most that many tokens)."""
    L, E = trace.num_layers, trace.num_experts
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    check_fits(topology, E, replicas)
    w, coact, flow = model_graph(trace, coact_tokens, flow_tokens)  # [L, E], [L, E, E] x 2
    w = np.maximum(w, 1e-6 * max(w.max(), 1.0))               # unseen experts still weigh a little
    node_cap = G * S - (topology.total_slots - E) // (2 * N)  # keep room for replicas in each node
    if node_cap * N < E:
        raise MoeccError(f"graph: {E} experts do not fit {N} nodes of {G} devices x {S} slots")
    valid = np.ones((L, E), dtype=bool)
    mean = (w.sum(1, keepdims=True) / N).repeat(N, 1)                         # [L, N]
    caps = dict(max_count=np.full((L, N), node_cap), max_load=mean * (1 + tol),
                final_load=mean * (1 + final_tol))
    node_of = None
    for _ in range(max(sweeps, 1)):
        anchor = None if node_of is None else neighbour_anchor(_onehot(node_of, N), flow)
        node_of = align(partition(coact, anchor, w, valid, spread=spread, **caps), flow, N)
    count = replicate(w, node_of, replicas, G, S, N)                        # [L, E]
    return place_devices(w, coact, flow, node_of, count, topology, device_tol, final_tol,
                         device_affinity)


def _onehot(labels: np.ndarray, parts: int) -> np.ndarray:
    """[L, n] int -> [L, n, parts] float."""
    return (labels[..., None] == np.arange(parts)).astype(np.float64)


def neighbour_anchor(member: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Pull of each part on each expert: member [L, E, P] (share of expert e in part p), flow
    [L, E, E] (flow[l] from layer l-1 to l; flow[0] = 0) -> [L, E, P] tokens arriving from the
    part in layer l-1 plus tokens leaving to it in layer l+1."""
    member = member.astype(flow.dtype)
    anchor = np.zeros(member.shape, dtype=flow.dtype)
    anchor[1:] += np.swapaxes(flow[1:], 1, 2) @ member[:-1]
    anchor[:-1] += flow[1:] @ member[1:]
    return anchor


def align(labels: np.ndarray, flow: np.ndarray, parts: int) -> np.ndarray:
    """Rename each layer's part labels [L, n] to follow layer l-1: greedy matching of the parts
    with the most flow between them."""
    labels = labels.copy()
    for l in range(1, len(labels)):
        agree = _onehot(labels[l - 1], parts).T @ flow[l] @ _onehot(labels[l], parts)   # [P, P]
        labels[l] = match(agree)[labels[l]]
    return labels


def match(agree: np.ndarray) -> np.ndarray:
    """[..., P, P] agreement between old parts (rows) and new parts (columns) -> [..., P] new label
    per column: greedy, the largest remaining agreement first."""
    agree = np.array(agree, dtype=np.float64)
    flat = agree.reshape(-1, *agree.shape[-2:])                             # [B, P, P]
    B, P = flat.shape[0], flat.shape[-1]
    rename = np.zeros((B, P), dtype=np.int64)
    rows = np.arange(B)
    for _ in range(P):
        a, b = np.divmod(flat.reshape(B, -1).argmax(1), P)
        rename[rows, b] = a
        flat[rows, a, :] = -np.inf
        flat[rows, :, b] = -np.inf
    return rename.reshape(agree.shape[:-1])


def replicate(w: np.ndarray, node_of: np.ndarray, replicas: int, per_node: int, slots: int,
              nodes: int) -> np.ndarray:
    """Copies per expert [L, E]: each extra copy to the largest load per copy with room in its node."""
    L, E = w.shape
    rows = np.arange(L)
    count = np.ones((L, E), dtype=np.int64)
    room = per_node * slots - np.stack([np.bincount(n, minlength=nodes) for n in node_of])  # [L, N]
    for _ in range(replicas):
        per_copy = np.where((np.take_along_axis(room, node_of, 1) > 0) & (count < per_node),
                            w / count, -1.0)
        hot = np.argmax(per_copy, 1)
        grow = per_copy[rows, hot] > 0                                      # layers with room left
        count[rows[grow], hot[grow]] += 1
        room[rows[grow], node_of[rows[grow], hot[grow]]] -= 1
    return count


def place_devices(w, coact, flow, node_of, count, topology: Topology, tol: float,
                  final_tol: float, device_affinity: float) -> np.ndarray:
    """Copies of every (layer, node) onto the node's devices -> share [L, E, D]."""
    L, E = w.shape
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    # copies of problem (l, n), padded to M: copy_of [L*N, M] expert id (-1 = padding)
    groups = [np.repeat(np.flatnonzero(node_of[l] == n), count[l][node_of[l] == n])
              for l in range(L) for n in range(N)]
    M = max(len(g) for g in groups)
    copy_of = np.full((L * N, M), -1, dtype=np.int64)
    for b, g in enumerate(groups):
        copy_of[b, :len(g)] = g
    valid = copy_of >= 0
    c = np.maximum(copy_of, 0)
    layer = np.repeat(np.arange(L), N)[:, None]                             # [B, 1]
    scale = np.where(valid, 1.0 / count[layer, c], 0.0)                     # [B, M]
    cw = w[layer, c] * scale
    affinity = coact[layer[:, :, None], c[:, :, None], c[:, None, :]] * (
        device_affinity * scale[:, :, None] * scale[:, None, :])
    mean = (cw.sum(1, keepdims=True) / G).repeat(G, 1)                       # [B, G]
    device = partition(affinity, None, cw, valid, np.full((L * N, G), S), mean * (1 + tol), group=c,
                       final_load=mean * (1 + final_tol))                   # [B, M] device in node
    return _align_devices(_to_share(copy_of, device, scale, L, E, N, G), flow, N, G)


def _to_share(copy_of, device, scale, L, E, N, G) -> np.ndarray:
    share = np.zeros((L, E, N * G))
    b, m = np.nonzero(copy_of >= 0)
    np.add.at(share, (b // N, copy_of[b, m], (b % N) * G + device[b, m]), scale[b, m])
    return share


def _align_devices(share: np.ndarray, flow: np.ndarray, N: int, G: int) -> np.ndarray:
    """Rename the devices inside each node of layer l to follow layer l-1 (share [L, E, D])."""
    share = share.copy()
    nodes = np.arange(N)
    for l in range(1, len(share)):
        agree = (share[l - 1].T @ flow[l] @ share[l]).reshape(N, G, N, G)[nodes, :, nodes]  # [N, G, G]
        rename = match(agree) + (nodes * G)[:, None]                      # [N, G] new device of each
        block = np.zeros_like(share[l])
        block[:, rename.ravel()] = share[l]
        share[l] = block
    return share
