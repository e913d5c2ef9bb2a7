"""Scoring a plan on a trace, as issue 8 defines it (score a plan on tokens it was NOT planned on).

Dispatch: token t's choice of expert e goes to the copy picked by a per-token hash u_t in [0, 1)
against the cumulative shares of e's copies (u_t = frac((t + 1) * golden ratio)), so copies take
their planned shares and one token's choices of co-located copies agree.

    device[l, t, j]   device computing slot j of token t in layer l                      [L, T, k]
    balancedness      sum_l mean_d load[l, d] / sum_l max_d load[l, d]; load = (token, expert) pairs
    device_sends      distinct (token, device) pairs per layer, summed (a token whose k experts
                      share a device is sent there once); node_sends the same with nodes
    device_moves      tokens whose layer-l devices share none with their layer-(l-1) devices (the
                      hidden state has to move), summed over l >= 1; node_moves the same with nodes
    device_traffic    device_sends + device_moves; node_traffic = node_sends + node_moves
    source            where a token's hidden state is: in layer 0 its home device t mod D; later
                      the first of its layer-(l-1) devices that layer l uses again, else the first
                      on a node that layer l uses, else its top-1 device of layer l-1
    inter_node_sends  (token, node) sends to nodes other than the source device's node
    a2a_ms            predicted all-to-all time, node-aware as in DeepEP: a token crosses to each
                      other node once and is forwarded inside it; per layer the busiest device's
                      time (token_bytes per send at inter / intra bandwidth), twice (dispatch +
                      combine), summed over layers
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .plan import Plan
from .trace import Trace, check_against_model

PHI = (5 ** 0.5 - 1) / 2
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


def dispatch(share: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """share [E, D], ids [T, k] -> device [T, k] computing each (token, expert) pair."""
    T = ids.shape[0]
    u = np.modf((np.arange(1, T + 1) * PHI))[0]                             # [T]
    cum = np.cumsum(share, axis=-1)
    cum /= cum[:, -1:]                                                      # [E, D], last = 1.0
    return (cum[ids] <= u[:, None, None]).sum(-1)                           # [T, k]


def device_loads(p: Plan, trace: Trace) -> np.ndarray:
    """[L, D] (token, expert) pairs each device computes."""
    D = p.topology.devices
    return np.stack([np.bincount(dispatch(p.share[l], trace.expert_ids[l]).ravel(), minlength=D)
                     for l in range(trace.num_layers)]).astype(np.float64)


def score(p: Plan, trace: Trace, token_bytes: int = 8192) -> Metrics:
    """Metrics of plan p on the tokens of `trace` (its layers and experts must match the plan's)."""
    check_against_model(trace, len(p.layers), p.num_experts)
    topo = p.topology
    D, G = topo.devices, topo.devices_per_node
    T = trace.num_tokens
    sums = dict.fromkeys(COUNTS, 0)
    mean_load = max_load = a2a_s = 0.0
    prev = None
    for l in range(trace.num_layers):
        dev = np.sort(dispatch(p.share[l], trace.expert_ids[l]), axis=1)     # [T, k]
        node = dev // G
        load = np.bincount(dev.ravel(), minlength=D)
        mean_load += load.mean()
        max_load += load.max()
        first = np.ones_like(dev, dtype=bool)
        first[:, 1:] = dev[:, 1:] != dev[:, :-1]                            # distinct devices [T, k]
        sums["device_sends"] += int(first.sum())
        sums["node_sends"] += T + int((node[:, 1:] != node[:, :-1]).sum())   # sorted: count changes
        if prev is None:
            source = np.arange(T) % D
        else:
            again = (prev[:, :, None] == dev[:, None, :]).any(2)            # [T, k_prev]
            near = ((prev // G)[:, :, None] == node[:, None, :]).any(2)     # [T, k_prev]
            sums["device_moves"] += int((~again.any(1)).sum())
            sums["node_moves"] += int((~near.any(1)).sum())
            source = prev[np.arange(T), np.argmax(2 * again + near, axis=1)]  # [T]
        inter, seconds = _a2a(source, dev, first, topo, token_bytes)
        sums["inter_node_sends"] += inter
        a2a_s += seconds
        prev = dev
    return Metrics(balancedness=mean_load / max(max_load, 1e-12), a2a_ms=1e3 * a2a_s, tokens=T,
                   planning_s=p.planning_s, **sums)


def _a2a(source, dev, first, topo, token_bytes) -> tuple[int, float]:
    """Dispatch of each token from its source device [T] to its sorted devices dev [T, k]
    (first [T, k] marks distinct ones), node by node -> (inter-node sends, seconds).

    One inter-node send per (token, other node) reaches the first of its devices there (the
    receiver), which forwards it inside the node; devices on the source node get it from the
    source. Each device's time: its larger of sent/received bytes over each link, the two added.
    """
    D, G, k = topo.devices, topo.devices_per_node, dev.shape[1]
    node, src_node = dev // G, source // G
    first_in_node = np.ones_like(first)
    first_in_node[:, 1:] = node[:, 1:] != node[:, :-1]                     # [T, k] sorted by device
    at = np.maximum.accumulate(np.where(first_in_node, np.arange(k), 0), axis=1)
    receiver = np.take_along_axis(dev, at, 1)                               # [T, k]
    src = np.broadcast_to(source[:, None], dev.shape)
    cross = first_in_node & (node != src_node[:, None])
    hub = np.where(node == src_node[:, None], src, receiver)
    inside = first & (dev != hub)
    busy = np.zeros(D)
    for mask, frm, bw in ((cross, src, topo.inter_gbps), (inside, hub, topo.intra_gbps)):
        sec = token_bytes / (bw * 1e9)
        busy += sec * np.maximum(np.bincount(frm[mask], minlength=D), np.bincount(dev[mask], minlength=D))
    return int(cross.sum()), 2.0 * float(busy.max(initial=0.0))
