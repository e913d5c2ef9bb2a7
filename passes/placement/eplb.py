"""EPLB: DeepSeek's expert-parallelism load balancer, ported faithfully from deepseek-ai/EPLB (eplb.py).

Given per-expert load [L, E] and E + R physical slots (E + R a multiple of the D devices):

    hierarchical (groups % nodes == 0):
      1. pack the `groups` contiguous expert groups onto nodes, groups_per_node each, heaviest first
         to the lightest node (balanced_packing);
      2. inside every node, replicate its experts: (E + R) / nodes copies, each new copy going to the
         expert with the largest load per copy (replicate_experts);
      3. pack each node's copies onto its devices, (E + R) / D per device (balanced_packing again).
    global (otherwise): the same with one group and one node.

A copy takes 1/count of its expert's tokens. Loads only: EPLB does not look at which experts are
chosen together. Only the steps' arithmetic is vectorized; the greedy order is the original's.
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

from .shares import from_physical
from .topology import Topology, check_fits
from .trace import Trace


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items into num_packs packs of exactly n / num_packs items each.

    weight [X, n] -> pack_index [X, n], rank_in_pack [X, n]. Heaviest item first, into the lightest
    pack that still has room.
    """
    X, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full((X, n), -1, dtype=np.int64)
    rank_in_pack = np.full((X, n), -1, dtype=np.int64)
    for i in range(X):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        row = weight[i].tolist()
        for item in order[i].tolist():
            pack = min((p for p in range(num_packs) if pack_items[p] < per_pack),
                       key=pack_weights.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += row[item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate num_log experts to num_phy copies minimizing the largest load per copy.

    weight [X, num_log] -> phy2log [X, num_phy], rank [X, num_phy], logcnt [X, num_log].
    """
    X, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy), (X, 1))
    rank = np.zeros((X, num_phy), dtype=np.int64)
    logcnt = np.ones((X, num_log), dtype=np.int64)
    rows = np.arange(X)
    for i in range(num_log, num_phy):
        hot = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = hot
        rank[:, i] = logcnt[rows, hot]
        logcnt[rows, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int,
                                   num_nodes: int, num_gpus: int) -> np.ndarray:
    """weight [L, E] -> pphy2log [L, num_physical]: the logical expert of each physical slot,
    slots numbered device by device (num_physical / num_gpus per device)."""
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus
    # Step 1: pack groups to nodes.                                        [L, groups]
    tokens_per_group = weight.reshape(L, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # Step 2: redundant experts within nodes.                   [L * nodes, E / nodes]
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)
    # Step 3: pack physical experts to GPUs.           [L * nodes, num_physical / nodes]
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, -1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1)
                 + np.arange(0, E, E // num_nodes)[None, :, None]).reshape(L, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, -1)


def eplb(trace: Trace, topology: Topology, replicas: int = 0, groups: int = 1) -> np.ndarray:
    """share [L, E, D] by EPLB on the trace's per-expert load; `groups` = the model's expert groups
    (hierarchical policy when groups is a multiple of the nodes, else the global policy)."""
    E, D, N = trace.num_experts, topology.devices, topology.nodes
    check_fits(topology, E, replicas)
    physical = E + replicas
    if physical % D:
        raise MoeccError(f"eplb fills every device equally, so experts + replicas ({E} + {replicas} = "
                         f"{physical}) must be a multiple of the {D} devices")
    if groups < 1 or E % groups:
        raise MoeccError(f"eplb: groups={groups} must divide the {E} experts")
    hierarchical = groups % N == 0
    pphy2log = rebalance_experts_hierarchical(trace.load(), physical, groups if hierarchical else 1,
                                              N if hierarchical else 1, D)
    device_of = np.broadcast_to(np.arange(physical) // (physical // D), pphy2log.shape)
    return from_physical(pphy2log, device_of, E, D)
