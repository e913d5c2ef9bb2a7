"""The EPLB port against DeepSeek's original torch code (deepseek-ai/EPLB eplb.py, MIT), copied here
verbatim (comments trimmed) as the reference."""
import numpy as np
import pytest
import torch

from moecc.errors import MoeccError
from moecc.passes.placement.eplb import eplb, rebalance_experts_hierarchical
from moecc.passes.placement.topology import parse_topology
from placement_helpers import random_trace


def ref_balanced_packing(weight, num_packs):
    num_layers, num_groups = weight.shape
    groups_per_pack = num_groups // num_packs
    if groups_per_pack == 1:
        pack_index = torch.arange(weight.size(-1), dtype=torch.int64).expand(weight.shape)
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)
    indices = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    for i in range(num_layers):
        pack_weights = [0] * num_packs
        pack_items = [0] * num_packs
        for group in indices[i]:
            pack = min((i for i in range(num_packs) if pack_items[i] < groups_per_pack),
                       key=pack_weights.__getitem__)
            pack_index[i, group] = pack
            rank_in_pack[i, group] = pack_items[pack]
            pack_weights[pack] += weight[i, group]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def ref_replicate_experts(weight, num_phy):
    n, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64)
    logcnt = torch.ones(n, num_log, dtype=torch.int64)
    arangen = torch.arange(n, dtype=torch.int64)
    for i in range(num_log, num_phy):
        redundant_indices = (weight / logcnt).max(dim=-1).indices
        phy2log[:, i] = redundant_indices
        rank[:, i] = logcnt[arangen, redundant_indices]
        logcnt[arangen, redundant_indices] += 1
    return phy2log, rank, logcnt


def ref_hierarchical(weight, num_physical_experts, num_groups, num_nodes, num_gpus):
    num_layers, num_logical_experts = weight.shape
    group_size = num_logical_experts // num_groups
    groups_per_node = num_groups // num_nodes
    phy_experts_per_gpu = num_physical_experts // num_gpus

    def inverse(perm):
        inv = torch.empty_like(perm)
        inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
        return inv

    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack_index, group_rank_in_pack = ref_balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = inverse(log2mlog)
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical_experts // num_nodes)
    phy2mlog, phyrank, mlogcnt = ref_replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = ref_balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + torch.arange(
        0, num_logical_experts, num_logical_experts // num_nodes).view(1, -1, 1)).flatten(-2)
    return mlog2log.gather(-1, pphy2mlog)


@pytest.mark.parametrize("E, phys, groups, nodes, gpus", [
    (16, 24, 4, 2, 8), (16, 16, 8, 2, 4), (32, 40, 1, 1, 8), (12, 16, 4, 4, 4), (24, 32, 6, 2, 8)])
def test_matches_deepseek_reference(E, phys, groups, nodes, gpus):
    weight = torch.rand(3, E, generator=torch.Generator().manual_seed(E + phys)) * 100 + 1
    ours = rebalance_experts_hierarchical(weight.double().numpy(), phys, groups, nodes, gpus)
    ref = ref_hierarchical(weight.double(), phys, groups, nodes, gpus).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_shares_follow_copies():
    trace = random_trace(np.random.default_rng(0), layers=2, experts=16, k=2, tokens=400)
    share = eplb(trace, parse_topology("2x2:slots=5"), replicas=4, groups=4)
    assert ((share > 0).sum(1) <= 5).all() and np.allclose(share.sum(-1), 1.0)
    hot = trace.load().argmax(1)
    for layer, e in enumerate(hot):    # the hottest expert: copies split its tokens evenly, and
        split = share[layer, e][share[layer, e] > 0]     # EPLB may stack two copies on one device
        copies = split / split.min()
        assert len(split) >= 2 and np.allclose(copies, np.round(copies))


def test_replicas_must_fill_devices_equally():
    trace = random_trace(np.random.default_rng(0), layers=1, experts=16, k=2, tokens=64)
    with pytest.raises(MoeccError, match=r"experts \+ replicas \(16 \+ 3 = 19\) must be a multiple of "
                                         r"the 4 devices"):
        eplb(trace, parse_topology("2x2:slots=5"), replicas=3)
    with pytest.raises(MoeccError, match="groups=5 must divide the 16 experts"):
        eplb(trace, parse_topology("2x2:slots=5"), replicas=4, groups=5)
