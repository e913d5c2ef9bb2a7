"""moecc's placement: partition the expert graphs so that tokens cross nodes less, loads balanced.

The graphs (graphs.py), per layer: experts are vertices weighted by load, co-activation edges join
experts one token chose together, flow edges join an expert of layer l-1 to one of layer l that a
token went through in turn. All layers are partitioned at once (partition.py):

    1. replicas: as in EPLB, each extra copy goes to the expert with the largest load per copy; a
                 copy takes 1/count of its expert's tokens (its load and edges scale by 1/count);
    2. nodes:    copies -> nodes by co-activation, under a node load cap, (1 + tol) * mean while
                 placing, then exchanges down to (1 + final_tol) * mean, and the node's slots.
                 Node labels of layer l are renamed to follow layer l-1 (greedy matching on the
                 flow between parts); each further sweep re-partitions with the flow to the parts
                 of layers l-1 and l+1 as anchors, weighted 1/k (a token's hidden state moves only
                 if none of its k experts stays), and renames again. Copies of a hot expert share
                 a node when the caps allow (affinity pulls them to the same experts), else spread;
    3. devices:  inside each node the same partition places its copies on devices (slots, copies
                 of one expert on different devices, the same load caps). Edge weights are scaled
                 by device_affinity: -1 (default) spreads co-activated experts over the node's
                 devices since their loads rise and fall together (balance), +1 packs them (fewer
                 intra-node sends). Device labels then follow layer l-1;
    4. shares:   the copies of replicated experts take unequal shares where that evens out the
                 devices' loads (shares.even_out).
"""
from __future__ import annotations

import numpy as np

from .graphs import model_graph
from .partition import partition
from .shares import even_out
from .topology import Topology, check_fits
from .trace import Trace


def graph_plan(trace: Trace, topology: Topology, replicas: int = 0, tol: float = 0.02,
               device_tol: float = 0.02, final_tol: float = 0.005, device_affinity: float = -1.0,
               sweeps: int | None = None, spread: float = 4.0, coact_tokens: int | None = 2048,
               flow_tokens: int | None = 1024, flow_weight: float | None = None) -> np.ndarray:
    """share [L, E, D] for the trace (tol / device_tol: allowed load above the mean of a node / of
    a device in its node while placing, final_tol: after exchanges; sweeps: node partition passes,
    default round(4 / k) but at least 1 (the 1/k-weighted anchors matter most for small k);
    spread: how hard heavy items avoid loaded parts; coact_tokens / flow_tokens: estimate edges
    from at most that many tokens; flow_weight: weight of the anchors, default 1/k)."""
    L, E = trace.num_layers, trace.num_experts
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    check_fits(topology, E, replicas)
    w, coact, flow = model_graph(trace, coact_tokens, flow_tokens)  # [L, E], [L, E, E] x 2
    w = np.maximum(w, 1e-6 * max(w.max(), 1.0))               # unseen experts still weigh a little
    count = replicate(w, replicas, topology.devices)                        # [L, E]
    copy_of = copies(count)                                                 # [L, M] (-1: padding)
    c, valid = np.maximum(copy_of, 0), copy_of >= 0
    rows = np.arange(L)[:, None]
    scale = np.where(valid, 1.0 / count[rows, c], 0.0)
    cw = w[rows, c] * scale                                                 # [L, M] copy loads
    affinity = copy_edges(coact, np.arange(L), c, scale)
    mean = (cw.sum(1, keepdims=True) / N).repeat(N, 1)                        # [L, N]
    caps = dict(max_count=np.full((L, N), G * S), max_load=mean * (1 + tol),
                final_load=mean * (1 + final_tol))
    node = None
    for _ in range(max(round(4 / trace.top_k) if sweeps is None else sweeps, 1)):
        anchor = None
        if node is not None:
            pull = neighbour_anchor(membership(copy_of, node, scale, E, N), flow) * (
                1.0 / trace.top_k if flow_weight is None else flow_weight)
            anchor = pull[rows, c] * scale[:, :, None]                      # [L, M, N]
        node = partition(affinity, anchor, cw, valid, spread=spread, **caps)
        _, rename = align(membership(copy_of, node, scale, E, N), flow, 1)
        node = np.where(valid, np.take_along_axis(rename, np.maximum(node, 0), 1), -1)
    share = place_devices(w, coact, flow, copy_of, node, scale, topology, device_tol, final_tol,
                          device_affinity)
    return even_out(share, w)


def replicate(w: np.ndarray, replicas: int, max_copies: int) -> np.ndarray:
    """Copies per expert [L, E]: each extra copy to the expert with the largest load per copy
    (EPLB's replicate_experts), at most max_copies each."""
    L, E = w.shape
    rows = np.arange(L)
    count = np.ones((L, E), dtype=np.int64)
    for _ in range(min(replicas, E * (max_copies - 1))):
        hot = np.argmax(np.where(count < max_copies, w / count, -1.0), 1)
        count[rows, hot] += 1
    return count


def copies(count: np.ndarray) -> np.ndarray:
    """[B, E] copies per expert -> [B, M] the expert of each copy (copies of one expert adjacent),
    padded with -1 to the largest total M."""
    M = int(count.sum(1).max())
    out = np.full((len(count), M), -1, dtype=np.int64)
    for b, row in enumerate(count):
        ids = np.repeat(np.arange(len(row)), row)
        out[b, :len(ids)] = ids
    return out


def copy_edges(coact: np.ndarray, layer: np.ndarray, c: np.ndarray, scale: np.ndarray,
               factor: float = 1.0):
    """Edges between copies, on demand: coact [L, E, E], problem b's layer [B], copies' experts
    c [B, M] -> rows(b, i) = factor * coact[layer[b], c[b, i], c[b]] * scale[b, i] * scale[b]
    ([..., M], float32), for partition (an [B, M, M] matrix would cost more than the partition)."""
    s = scale.astype(np.float32)

    def rows(b, i):
        r = coact[layer[b], c[b, i]]                                        # [..., E]
        out = np.take_along_axis(r, c[b], -1)                               # [..., M]
        return out * (np.float32(factor) * s[b, i][..., None] * s[b])

    return rows


def membership(copy_of: np.ndarray, part: np.ndarray, scale: np.ndarray, E: int,
               P: int) -> np.ndarray:
    """Copies' parts [L, M] -> [L, E, P]: the share of each expert's tokens in each part."""
    out = np.zeros((len(copy_of), E, P))
    b, m = np.nonzero(copy_of >= 0)
    np.add.at(out, (b, copy_of[b, m], part[b, m]), scale[b, m])
    return out


def neighbour_anchor(member: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Pull of each part on each expert: member [L, E, P] (share of expert e in part p), flow
    [L, E, E] (flow[l] from layer l-1 to l; flow[0] = 0) -> [L, E, P] tokens arriving from the
    part in layer l-1 plus tokens leaving to it in layer l+1."""
    member = member.astype(flow.dtype)
    anchor = np.zeros(member.shape, dtype=flow.dtype)
    anchor[1:] += np.swapaxes(flow[1:], 1, 2) @ member[:-1]
    anchor[:-1] += flow[1:] @ member[1:]
    return anchor


def align(member: np.ndarray, flow: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Rename parts so that layer l follows layer l-1: member [L, E, P] (share of expert e in part
    p), parts renamed only within each of `blocks` equal blocks (devices stay in their node) ->
    (renamed member, rename [L, P] = new label of each old one). Greedy matching on the flow."""
    member = member.copy()
    L, E, P = member.shape
    size = P // blocks
    rename = np.tile(np.arange(P), (L, 1))
    blk = np.arange(blocks)
    for l in range(1, L):
        agree = (member[l - 1].T @ flow[l] @ member[l]).reshape(blocks, size, blocks, size)
        rename[l] = (match(agree[blk, :, blk]) + (blk * size)[:, None]).ravel()
        moved = np.zeros_like(member[l])
        moved[:, rename[l]] = member[l]
        member[l] = moved
    return member, rename


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


def place_devices(w, coact, flow, copy_of, node, scale, topology: Topology, tol: float,
                  final_tol: float, device_affinity: float) -> np.ndarray:
    """Each node's copies onto its devices (one problem per layer and node) -> share [L, E, D]."""
    L, E = w.shape
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    per = [np.flatnonzero(node[l] == n) for l in range(L) for n in range(N)]  # copies of (l, n)
    pos = np.full((L * N, max(len(p) for p in per)), -1, dtype=np.int64)   # [B, M] copy index
    for b, p in enumerate(per):
        pos[b, :len(p)] = p
    valid = pos >= 0
    layer = np.repeat(np.arange(L), N)[:, None]                             # [B, 1]
    c = np.where(valid, copy_of[layer, np.maximum(pos, 0)], 0)              # [B, M] expert
    sc = np.where(valid, scale[layer, np.maximum(pos, 0)], 0.0)
    cw = w[layer, c] * sc
    affinity = copy_edges(coact, layer[:, 0], c, sc, device_affinity)
    mean = (cw.sum(1, keepdims=True) / G).repeat(G, 1)                       # [B, G]
    device = partition(affinity, None, cw, valid, np.full((L * N, G), S), mean * (1 + tol),
                       group=c, final_load=mean * (1 + final_tol))          # [B, M] device in node
    b, m = np.nonzero(valid)
    share = np.zeros((L, E, N * G))
    np.add.at(share, (b // N, c[b, m], (b % N) * G + device[b, m]), sc[b, m])
    return align(share, flow, N)[0]
