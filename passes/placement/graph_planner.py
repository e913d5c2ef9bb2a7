"""moecc's placement: partition the expert graphs so that tokens cross nodes less, loads balanced.

The graphs (graphs.py), per layer: experts are vertices weighted by load, co-activation edges join
experts one token chose together, flow edges join an expert of layer l-1 to one of layer l that a
token went through in turn. All layers are planned at once, each step batched over layers in numpy:

    1. replicas:  as in EPLB, each extra copy goes to the expert with the largest load per copy; a
                  copy takes 1/count of its expert's tokens (its load and edges scale by 1/count);
    2. clusters:  (E >= 32) label propagation on the co-activation graph (refine.communities)
                  finds the groups of experts that tokens choose together. A layer whose clusters
                  hold little more co-activation than chance (modularity < min_modularity) has
                  no structure to place by: its edges are dropped and it is placed for balance
                  only (edges fitted to noise cost balance on the next window and save nothing).
                  Clusters of consecutive layers that hand each other most of their tokens are
                  chained in a networkx graph, and each chain is dealt to one node (chains.py):
                  copies are pulled towards their chain's node, so that a token's experts of
                  consecutive layers share a node and its hidden state stays there;
    3. nodes:     copies -> nodes greedily, cluster by cluster (heaviest first), each copy to the
                  node with most co-activation plus pull, under a node load cap, (1 + tol) * mean
                  while placing, then exchanges down to (1 + final_tol) * mean, and the node's
                  slots (partition.py); then Kernighan-Lin swaps between pairs of nodes
                  (refine.refine) mend the clusters the caps split. Node labels of layer l are
                  renamed to follow layer l-1 (matching on the flow between them). With sweeps > 1
                  (default for top-1/2 routing) the nodes are re-planned with the flow to the nodes
                  of layers l-1 and l+1 as a further pull, weighted 1/k (a token's hidden state
                  moves only if none of its k experts stays);
    4. devices:   inside each node the copies are packed onto devices, heaviest first onto the
                  least loaded device with a free slot that holds no copy of the same expert
                  (co-activation inside a node does not change node traffic; measured, placing it
                  on devices did not lower device traffic enough to pay); device labels then
                  follow layer l-1;
    5. shares:    the copies of replicated experts take unequal shares where that evens out the
                  devices' loads (shares.even_out; it matters for few experts, e.g. E = 8).
    local:        with local_replicas, the hottest experts of clustered layers get copies on every
                  node (one per node, or as many as keep a copy within a device's mean load) and
                  keep their tokens on the token's node (metrics.dispatch); which node's
                  tokens they take is found by following the tokens through the layers
                  (local_sources), and those loads go into the node caps (a further node sweep)
                  and the device packing.

The flow edges are used factored (graphs.token_counts / token_parts: per token, its choices in
each part), which gives the same sums as the [E, E] flow matrices without building them.

Why numpy and not networkx for the expert graphs: 58 layers x 256 experts have ~1.9 M
co-activation edges; building them as networkx.Graph objects alone takes seconds (the target is
0.5 s for the whole plan), and networkx's partitioners (kernighan_lin_bisection, louvain) run per
graph in Python. networkx holds the coarse graph, clusters x layers (chains.py), and
graphs.expert_graph builds the full expert graph in networkx to inspect and export.
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

from .chains import chain_nodes
from .graphs import _sample, coactivation, token_counts, token_hash, token_node, token_parts
from .partition import partition
from .refine import communities, community_order, modularity, refine
from .shares import even_out
from .topology import Topology, check_fits
from .trace import Trace


MIN_CLUSTER_EXPERTS = 32    # fewer experts per layer: no clusters to find (the greedy goes by load)


def graph_plan(trace: Trace, topology: Topology, replicas: int = 0, tol: float = 0.02,
               final_tol: float = 0.005, sweeps: int | None = None, spread: float = 4.0,
               refine_rounds: int = 1, neighbours: int = 8, lp_iters: int = 4,
               coact_tokens: int | None = 2048, flow_tokens: int | None = 1024,
               flow_weight: float | None = None, clusters: bool | None = None,
               chain_pull: float = 0.5, chain_tokens: int = 256, align_tokens: int = 512,
               min_modularity: float = 0.1, local_replicas: int = 0,
               source_tokens: int | None = 2048):
    """share [L, E, D] for the trace (tol: allowed load above the mean of a node / of a device in
    its node while placing, final_tol: after exchanges; sweeps: node partition passes, default
    round(4 / k) but at least 1; spread: how hard heavy copies avoid loaded nodes; refine_rounds:
    rounds of swaps over all node pairs; neighbours / lp_iters: label propagation; coact_tokens /
    flow_tokens: estimate edges from at most that many tokens; flow_weight: weight of the pull
    of the neighbouring layers' nodes, default 1/k; clusters: find clusters, chain them and
    order the greedy by them, default when E >= 32; chain_pull: pull of a chain's node, times
    the copy's load; chain_tokens / align_tokens: tokens to chain clusters / to align device labels
    by; min_modularity: below it a
    layer is placed for balance only; local_replicas: replicas spent on node-local experts, copies
    on every node (local_experts; default 0); source_tokens: tokens to estimate which nodes
    local experts' tokens come from) -> (share [L, E, D], local [L, E] bool)."""
    L, E, T, k = trace.num_layers, trace.num_experts, trace.num_tokens, trace.top_k
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    check_fits(topology, E, replicas)
    w = trace.load()
    w = np.maximum(w, 1e-6 * max(w.max(), 1.0))               # unseen experts still weigh a little
    if not 0 <= local_replicas <= replicas:
        raise MoeccError(f"graph: local_replicas={local_replicas} must be between 0 and the "
                         f"{replicas} replicas (each node-local expert takes at least {N - 1} of them)")
    if local_replicas and N < 2:
        raise MoeccError(f"graph: local_replicas={local_replicas} needs a topology of 2 or more nodes "
                         f"({topology} has one); drop --local-replicas")
    if 0 < local_replicas < N - 1:
        raise MoeccError(f"graph: local_replicas={local_replicas} is too small for one node-local expert "
                         f"(a copy on each of the {N} nodes takes {N - 1}); use 0 or at least {N - 1}")
    coact = coactivation(trace, coact_tokens)                               # [L, E, E]
    rows = np.arange(L)[:, None]
    flat = np.zeros(L, bool)
    find = E >= MIN_CLUSTER_EXPERTS if clusters is None else clusters
    if find:
        label = communities(coact, w, np.ones((L, E), bool), neighbours, lp_iters)   # [L, E]
        flat = modularity(coact, label, w) < min_modularity                # [L]
    per = local_experts(w, local_replicas, N, G) * ~flat[:, None]          # [L, E] none where flat
    local = per > 0
    count = replicate(np.where(local, -1.0, w), replicas - ((per * N - 1) * local).sum(1),
                      topology.devices) * ~local                            # [L, E] (local: 0)
    copy_of = copies(count)                                                 # [L, M] (-1: padding)
    c, valid = np.maximum(copy_of, 0), copy_of >= 0
    scale = np.where(valid, 1.0 / np.maximum(count[rows, c], 1), 0.0)
    cw = w[rows, c] * scale                                                 # [L, M] copy loads
    A = copy_graph(coact, c, scale)                                         # [L, M, M]
    ids = trace.expert_ids[:, _sample(T, flow_tokens)]                      # [L, T', k]
    order = chain = None
    if find:
        A[flat] = 0.0
        order = np.where(flat[:, None], 0, community_order(label[rows, c], cw, valid))
        if chain_pull > 0 and N > 1 and L > 1 and not flat.all():
            home = chain_nodes(label, w, ids[:, _sample(ids.shape[1], chain_tokens)],
                               N)[rows, c]                                  # [L, M], -1: none
            chain = np.where(((home[:, :, None] == np.arange(N)) & valid[:, :, None]
                              & ~flat[:, None, None]), chain_pull * cw[:, :, None], 0.0)
    source = np.full((L, E, N), 1.0 / N)           # where local experts' tokens come from, by node
    mean = ((cw.sum(1) + (w * local).sum(1)) / N)[:, None].repeat(N, 1)     # [L, N]
    node, anchor = None, chain
    sweeps = max(round(4 / k) if sweeps is None else sweeps, 1)
    for sweep in range(sweeps + local.any()):
        member = None if node is None else membership(copy_of, node, scale, E, N)   # [L, E, N]
        if member is not None and local.any():
            every = _sample(T, source_tokens)
            source = local_sources(trace.expert_ids[:, every], every, member, local, topology)
        fixed = np.einsum("le,len->ln", w * local, source)                  # [L, N]
        caps = dict(max_count=(G * S - per.sum(1))[:, None].repeat(N, 1),
                    max_load=mean * (1 + tol) - fixed, final_load=mean * (1 + final_tol) - fixed)
        if member is not None and sweep < sweeps:
            pull = neighbour_pull(ids, member, E) * (
                T / ids.shape[1] / k * (1.0 / k if flow_weight is None else flow_weight))
            anchor = pull[rows, c] * scale[:, :, None] + (0.0 if chain is None else chain)
        node = partition(A, anchor, cw, valid, spread=spread, order_key=order, **caps)
        node = refine(A, cw, node, valid, caps["final_load"], refine_rounds, anchor)
        _, rename = align(membership(copy_of, node, scale, E, N), ids, 1)
        node = np.where(valid, np.take_along_axis(rename, np.maximum(node, 0), 1), -1)
    if local.any():                                 # per[l, e] copies of a local expert per node
        held = copies(per * N)                                              # [L, n] (-1: pad)
        at = np.where(held >= 0, np.arange(held.shape[1]) % N, -1)
        copy_of = np.concatenate([copy_of, held], 1)
        node = np.concatenate([node, at], 1)
        part = np.maximum(source, 1e-3)                 # a copy with no tokens yet keeps its slot
        part /= part.sum(2, keepdims=True)
        h = np.maximum(held, 0)
        scale = np.concatenate([scale, np.where(held >= 0, part[rows, h, np.maximum(at, 0)]
                                                / np.maximum(per[rows, h], 1), 0.0)], 1)
    share = place_devices(w, copy_of, node, scale, topology, tol, final_tol)
    share = align(share, ids[:, _sample(ids.shape[1], align_tokens)], N)[0]
    return even_out(share, w, rounds=16, fixed=local), local


def local_sources(ids: np.ndarray, tokens: np.ndarray, member: np.ndarray, local: np.ndarray,
                  topology: Topology) -> np.ndarray:
    """[L, E, N]: for each local expert, the share of the tokens choosing it that come from each
    node, following the sampled tokens ids [L, T', k] (their indices `tokens`) through the layers
    as metrics.routes does: other experts on the node their token's hash picks from their node
    shares (member [L, E, N]); devices are numbered node by node, so that is the node of the
    device metrics.dispatch picks."""
    L, E, N = member.shape
    node = (tokens % topology.devices) // topology.devices_per_node         # home nodes
    u = token_hash(tokens)[:, None]                                         # [T', 1]
    out = np.zeros((L, E, N))
    for l in range(L):
        e = np.maximum(ids[l], 0)
        mine = local[l][e] & (ids[l] >= 0)                                  # [T', k]
        out[l] = np.bincount((e * N + node[:, None])[mine], minlength=E * N).reshape(E, N)
        at = np.where(mine, node[:, None], member[l].argmax(1)[e])          # one node: its own
        split = (member[l].max(1) < 1 - 1e-9)[e] & ~mine                    # copies on several
        if split.any():
            cum = np.cumsum(member[l][e[split]], -1)                        # [pairs, N]
            t = np.broadcast_to(u, e.shape)[split][:, None]
            at[split] = np.minimum((cum <= t * cum[:, -1:]).sum(-1), N - 1)
        node = token_node(np.where(ids[l] >= 0, at, -1), N, node)
    total = out.sum(2, keepdims=True)
    return np.where(total > 0, out / np.maximum(total, 1e-12), 1.0 / N)


def local_experts(w: np.ndarray, replicas: int, nodes: int, per_node: int) -> np.ndarray:
    """[L, E] copies per node of each node-local expert (0: not local), hottest first while the
    `replicas` last: an expert gets as many copies on every node as keep one copy's expected load
    (its load / nodes / copies) within a device's mean share (at most per_node, the devices of a
    node), at nodes * copies - 1 replicas. A token's choice of one stays on its node."""
    L, E = w.shape
    per = np.zeros((L, E), dtype=np.int64)
    if nodes < 2:
        return per
    share = w / np.maximum(w.sum(1, keepdims=True), 1e-12)                 # [L, E]
    need = np.clip(np.ceil(share * per_node - 1e-9), 1, per_node).astype(np.int64)
    for l in range(L):
        left = replicas
        for e in np.argsort(-w[l], kind="stable"):
            if nodes * need[l, e] - 1 > left:
                break
            per[l, e] = need[l, e]
            left -= nodes * need[l, e] - 1
    return per


def copy_graph(coact: np.ndarray, c: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """coact [L, E, E], copies' experts c [L, M], scale [L, M] (1/count; 0 for padding) ->
    A [L, M, M] float32: A[l, i, j] = coact[l, c_i, c_j] * scale_i * scale_j (copies of one
    expert are not joined: coact's diagonal is 0)."""
    L, M = c.shape
    A = np.empty((L, M, M), dtype=np.float32)
    s = scale.astype(np.float32)
    for l in range(L):                              # per layer: np.take is far cheaper than one
        np.take(coact[l].take(c[l], 0), c[l], 1, out=A[l])     # [L, M, M] fancy index
        A[l] *= np.outer(s[l], s[l])
    return A


def replicate(w: np.ndarray, replicas, max_copies: int) -> np.ndarray:
    """Copies per expert [L, E]: each extra copy to the expert with the largest load per copy
    (EPLB's replicate_experts), at most max_copies each; replicas: one budget, or one per layer."""
    L, E = w.shape
    rows = np.arange(L)
    budget = np.broadcast_to(np.minimum(replicas, E * (max_copies - 1)), (L,))
    count = np.ones((L, E), dtype=np.int64)
    for i in range(int(budget.max(initial=0))):
        hot = np.argmax(np.where(count < max_copies, w / count, -1.0), 1)
        count[rows, hot] += i < budget
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


def membership(copy_of: np.ndarray, part: np.ndarray, scale: np.ndarray, E: int,
               P: int) -> np.ndarray:
    """Copies' parts [L, M] -> [L, E, P]: the share of each expert's tokens in each part."""
    out = np.zeros((len(copy_of), E, P))
    b, m = np.nonzero(copy_of >= 0)
    np.add.at(out, (b, copy_of[b, m], part[b, m]), scale[b, m])
    return out


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




def neighbour_pull(ids: np.ndarray, member: np.ndarray, E: int) -> np.ndarray:
    """ids [L, T, k], member [L, E, P] -> [L, E, P]: per expert, the summed part shares of the
    choices of the tokens that chose it, in the previous and the next layer (the flow edges'
    pull, unnormalized: multiply by T / T' / k)."""
    L, T, k = ids.shape
    P = member.shape[2]
    U = token_parts(ids, member)                                            # [L, T, P]
    V = np.zeros_like(U)
    V[1:] += U[:-1]
    V[:-1] += U[1:]
    keep = ids >= 0
    lay = np.broadcast_to(np.arange(L)[:, None, None], ids.shape)[keep]
    flat = lay * E + ids[keep]                                              # [pairs]
    vals = np.broadcast_to(V[:, :, None, :], ids.shape + (P,))[keep]        # [pairs, P]
    return np.stack([np.bincount(flat, vals[:, p], L * E) for p in range(P)], 1).reshape(L, E, P)


def align(member: np.ndarray, ids: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Rename parts so that layer l follows layer l-1: member [L, E, P] (share of expert e in part
    p), ids [L, T, k] the tokens whose flow between layers counts; parts renamed only within each
    of `blocks` equal blocks (devices stay in their node) -> (renamed member, rename [L, P] = new
    label of each old one). Greedy matching on the flow agreement U[l-1]^T U[l], U counting each
    token's choices per part (an expert counted in its largest-share part)."""
    member = member.copy()
    L, E, P = member.shape
    size = P // blocks
    rename = np.tile(np.arange(P), (L, 1))
    blk = np.arange(blocks)
    U = token_counts(ids, member.argmax(2), P)                              # [L, T, P]
    for l in range(1, L):
        agree = (U[l - 1].T @ U[l]).reshape(blocks, size, blocks, size)
        rename[l] = (match(agree[blk, :, blk]) + (blk * size)[:, None]).ravel()
        moved = np.zeros_like(member[l])
        moved[:, rename[l]] = member[l]
        member[l] = moved
        U[l][:, rename[l]] = U[l].copy()
    return member, rename


def place_devices(w, copy_of, node, scale, topology: Topology, tol: float,
                  final_tol: float) -> np.ndarray:
    """Each node's copies onto its devices (one packing problem per layer and node): heaviest
    first, copies of one expert on different devices -> share [L, E, D]."""
    L, E = w.shape
    N, G, S = topology.nodes, topology.devices_per_node, topology.slots
    B = L * N
    key = np.where(copy_of >= 0, node, N)                                   # padding last
    order = np.argsort(key, axis=1, kind="stable")                          # [L, M] by node
    sizes = np.stack([(node == n).sum(1) for n in range(N)], 1)             # [L, N]
    width = int(sizes.max(initial=1))
    start = np.concatenate([np.zeros((L, 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], 1)
    slot = start[:, :, None] + np.arange(width)                             # [L, N, width]
    valid = (np.arange(width) < sizes[:, :, None]).reshape(B, width)
    pos = np.take_along_axis(order, np.minimum(slot, order.shape[1] - 1).reshape(L, -1), 1)
    pos = np.where(valid, pos.reshape(B, width), -1)                        # [B, width] copy index
    layer = np.repeat(np.arange(L), N)[:, None]                             # [B, 1]
    c = np.where(valid, copy_of[layer, np.maximum(pos, 0)], 0)              # [B, width] expert
    sc = np.where(valid, scale[layer, np.maximum(pos, 0)], 0.0)
    cw = w[layer, c] * sc
    mean = (cw.sum(1, keepdims=True) / G).repeat(G, 1)                      # [B, G]
    device = partition(None, None, cw, valid, np.full((B, G), S), mean * (1 + tol),
                       group=c, final_load=mean * (1 + final_tol))          # [B, width]
    b, m = np.nonzero(valid)
    share = np.zeros((L, E, N * G))
    np.add.at(share, (b // N, c[b, m], (b % N) * G + device[b, m]), sc[b, m])
    return share
