"""Scoring a plan on a trace, as issue 8 defines it (score a plan on tokens it was NOT planned on).

Dispatch: token t's choice of expert e goes to the copy picked by a per-token hash u_t in [0, 1)
against the cumulative shares of e's copies (u_t = frac((t + 1) * golden ratio)), so copies take
their planned shares and one token's choices of co-located copies agree. A node-local expert
(plan.local) sends a token to its copies on the token's own node (their shares renormalized), if
that node holds one; the token's node before layer l is its home device's node in layer 0, later
the node of most of its kept layer-(l-1) choices (ties: the best-ranked choice's node).

    device[l, t, j]   device computing slot j of token t in layer l (-1: dropped)          [L, T, k]
    balancedness      sum_l mean_d load[l, d] / sum_l max_d load[l, d]; load = (token, expert) pairs
    device_sends      distinct (token, device) pairs per layer, summed (a token whose k experts
                      share a device is sent there once); node_sends the same with nodes
    device_moves      tokens whose layer-l devices share none with their layer-(l-1) devices (the
                      hidden state has to move), summed over l >= 1; node_moves the same with nodes
    device_traffic    device_sends + device_moves; node_traffic = node_sends + node_moves
    source            where a token's hidden state is: in layer 0 its home device t mod D; later
                      the first of its layer-(l-1) devices that layer l uses again, else the first
                      on a node that layer l uses, else its top-1 (first kept) device of layer l-1
    inter_node_sends  (token, node) sends to nodes other than the source device's node
    a2a_ms            predicted all-to-all time, node-aware as in DeepEP: a token crosses to each
                      other node once, to the device of its source's local rank there (rail-
                      aligned), and is forwarded inside the node; per layer the busiest device's
                      time (token_bytes per send at inter / intra bandwidth), twice (dispatch +
                      combine), summed over layers
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .graphs import token_hash, token_node
from .plan import Plan
from .trace import Trace, check_against_model

COUNTS = ("device_sends", "node_sends", "device_moves", "node_moves", "inter_node_sends")


@dataclass(frozen=True)
class Metrics:
    balancedness: float
    device_sends: int
    node_sends: int
    device_moves: int
    node_moves: int
    inter_node_sends: int
    a2a_ms: float
    tokens: int
    planning_s: float = 0.0

    @property
    def device_traffic(self) -> int:
        return self.device_sends + self.device_moves

    @property
    def node_traffic(self) -> int:
        return self.node_sends + self.node_moves

    def to_dict(self) -> dict:
        return dict(asdict(self), device_traffic=self.device_traffic, node_traffic=self.node_traffic)


def dispatch(share: np.ndarray, ids: np.ndarray, local: np.ndarray | None = None,
             node: np.ndarray | None = None, per_node: int = 1,
             tokens: np.ndarray | None = None) -> np.ndarray:
    """share [E, D], ids [T, k] -> device [T, k] computing each (token, expert) pair (-1: dropped).
    local [E] bool: experts whose tokens stay on their node [T] (devices per_node to a node) where
    it holds a copy. tokens [T]: the tokens' numbers t in the hash u_t (default 0..T-1; the
    expert-parallel runtime passes each rank's global token numbers: moecc.distributed.layout)."""
    u = token_hash(np.arange(ids.shape[0]) if tokens is None else np.asarray(tokens))   # [T]
    e = np.maximum(ids, 0)
    if local is not None and local.any():           # per token: local experts' rows differ
        rows = share[e]                                                     # [T, k, D]
        mine = (np.arange(share.shape[1]) // per_node) == node[:, None, None]   # [T, 1, D]
        here = rows * mine
        stay = local[e] & (here.sum(-1) > 0)                                # [T, k]
        cum = _cumulative(np.where(stay[:, :, None], here, rows))
    else:                                           # one row per expert, gathered per token
        cum = _cumulative(share)[e]
    return np.where(ids >= 0, (cum <= u[:, None, None]).sum(-1), -1)       # [T, k]


def _cumulative(rows: np.ndarray) -> np.ndarray:
    """[..., D] shares -> their cumulative sums over D, normalized so the last is 1.0."""
    cum = np.cumsum(rows, axis=-1)
    return cum / cum[..., -1:]


def routes(p: Plan, trace: Trace):
    """Per layer, in order: device [T, k] computing each (token, expert) pair (-1: dropped)."""
    D, G, N = p.topology.devices, p.topology.devices_per_node, p.topology.nodes
    node = (np.arange(trace.num_tokens) % D) // G                           # home nodes
    for l in range(trace.num_layers):
        raw = dispatch(p.share[l], trace.expert_ids[l], p.local[l], node, G)
        yield raw
        if p.local.any():
            node = token_node(np.where(raw >= 0, raw // G, -1), N, node)


def device_loads(p: Plan, trace: Trace) -> np.ndarray:
    """[L, D] (token, expert) pairs each device computes."""
    D = p.topology.devices
    return np.stack([np.bincount(d[d >= 0], minlength=D) for d in routes(p, trace)]
                    ).astype(np.float64)


def _distinct(sorted_ids: np.ndarray) -> np.ndarray:
    """[T, k] sorted per row (-1 first) -> [T, k] True at the first occurrence of each id >= 0."""
    first = sorted_ids >= 0
    first[:, 1:] &= sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return first


def score(p: Plan, trace: Trace, token_bytes: int = 8192) -> Metrics:
    """Metrics of plan p on the tokens of `trace` (its layers and experts must match the plan's)."""
    check_against_model(trace, len(p.layers), p.num_experts)
    topo = p.topology
    D, G = topo.devices, topo.devices_per_node
    T, rows = trace.num_tokens, np.arange(trace.num_tokens)
    sums = dict.fromkeys(COUNTS, 0)
    mean_load = max_load = a2a_s = 0.0
    source = rows % D                                                       # home devices
    prev = None
    for raw in routes(p, trace):                                            # [T, k] slot order
        dev = np.sort(raw, axis=1)
        node = np.where(dev >= 0, dev // G, -1)
        load = np.bincount(dev[dev >= 0], minlength=D)
        mean_load += load.mean()
        max_load += load.max()
        first = _distinct(dev)
        sums["device_sends"] += int(first.sum())
        sums["node_sends"] += int(_distinct(node).sum())
        if prev is not None:
            here = (dev >= 0).any(1) & (prev >= 0).any(1)                   # [T] both layers used
            again = ((prev[:, :, None] == dev[:, None, :]) & (prev >= 0)[:, :, None]).any(2)
            near = ((prev // G)[:, :, None] == node[:, None, :]).any(2) & (prev >= 0)
            sums["device_moves"] += int((here & ~again.any(1)).sum())
            sums["node_moves"] += int((here & ~near.any(1)).sum())
            top1 = prev[rows, np.argmax(prev >= 0, axis=1)]                  # first kept slot
            pick = prev[rows, np.argmax(2 * again + near, axis=1)]
            source = np.where(here, np.where((again | near).any(1), pick, top1), source)
        inter, seconds = _a2a(source, dev, node, first, topo, token_bytes)
        sums["inter_node_sends"] += inter
        a2a_s += seconds
        prev = raw
    return Metrics(balancedness=mean_load / max(max_load, 1e-12), a2a_ms=1e3 * a2a_s, tokens=T,
                   planning_s=p.planning_s, **sums)


def _a2a(source, dev, node, first, topo, token_bytes) -> tuple[int, float]:
    """Dispatch of each token from its source device [T] to its sorted devices dev [T, k]
    (node [T, k] their nodes, first [T, k] marks distinct ones), node by node -> (inter-node
    sends, seconds).

    Rail-aligned, as DeepEP's internode dispatch: one inter-node send per (token, other node) goes
    to the device of the source's local rank on that node (the receiver), which forwards it over
    the intra-node links to the token's devices there; devices on the source node get it from the
    source. Each device's time: its larger of sent/received bytes over each link, the two added.
    """
    D, G = topo.devices, topo.devices_per_node
    src_node = source // G
    receiver = node * G + (source % G)[:, None]                             # [T, k] same rank
    src = np.broadcast_to(source[:, None], dev.shape)
    cross = _distinct(node) & (node != src_node[:, None])                   # one per other node
    hub = np.where(node == src_node[:, None], src, receiver)
    inside = first & (dev != hub)
    busy = np.zeros(D)
    for mask, frm, to, bw in ((cross, src, receiver, topo.inter_gbps),
                              (inside, hub, dev, topo.intra_gbps)):
        sec = token_bytes / (bw * 1e9)
        busy += sec * np.maximum(np.bincount(frm[mask], minlength=D), np.bincount(to[mask], minlength=D))
    return int(cross.sum()), 2.0 * float(busy.max(initial=0.0))
