"""Balancing losses (hand-computed, and transformers' Switch loss), the aux-loss mechanism of
moecc.nn.MoE, the correction-bias update, and the training-only router extras."""
import math

import pytest
import torch

import tiny_gpt
from moecc import balance
from moecc.frontend import capture
from moecc.errors import MoeccError
from moecc.nn import MoE, from_graph
from moecc.passes.upcycle import upcycle
from moecc.perturb import perturb_experts
from moecc.pipeline import moe_nodes
from moecc.routing import route
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal


def layer(kind="softmax_topk", k=2, E=4, H=8, **router):
    torch.manual_seed(0)
    return MoE(MoESpec(E, H, 16, router=RouterSpec(kind, k, **router), name="l0"))


def Phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_switch_loss_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert balance.switch_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(2 * 0.7)   # f=(1,0)
    assert balance.switch_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)       # f=(.5,.5)
    assert balance.switch_loss(probs, torch.tensor([[0], [-1]])).item() == pytest.approx(1.4)      # drop ignored


def test_switch_loss_is_transformers_load_balancing_loss_over_k():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    logits = torch.randn(20, 6)
    s = MoESpec(6, 4, 4, router=RouterSpec("softmax_topk", 2))
    ids = route(logits, s)[1]
    ours = balance.switch_loss(torch.softmax(logits, -1), ids)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    assert theirs.item() == pytest.approx(2 * ours.item(), rel=1e-5)


def test_cv_importance_load_z_by_hand():
    assert balance.cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)
    s = MoESpec(2, 4, 4, router=RouterSpec("softmax_topk", 1, renormalize=False))
    g = balance.gates(torch.tensor([[0.7, 0.3], [0.6, 0.4]]).log(), s)
    torch.testing.assert_close(g, torch.tensor([[0.7, 0.0], [0.6, 0.0]]))
    assert balance.importance_loss(g).item() == pytest.approx(1.0)          # importance (1.3, 0)
    clean, noisy, std = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[1.5, 0.2, -2.0]]), torch.ones(1, 3)
    p = balance.prob_in_top_k(clean, noisy, std, k=1)
    # expert 0 is in: threshold = 2nd best noisy (0.2); the others are out: threshold = best (1.5)
    torch.testing.assert_close(p, torch.tensor([[Phi(0.8), Phi(-1.5), Phi(-2.5)]]))
    assert balance.z_loss(torch.zeros(3, 2), s).item() == pytest.approx(math.log(2) ** 2)
    h = MoESpec(4, 4, 4, router=RouterSpec("hierarchical", 1, n_groups=2))
    assert balance.z_loss(torch.zeros(3, 6), h).item() == pytest.approx(2 * math.log(2) ** 2)


def test_aux_loss_mechanism_sums_weighted_layer_means_and_reaches_the_router():
    model = torch.nn.Sequential(layer(), layer("sigmoid_topk")).train()
    x = torch.randn(2, 5, 8)
    model(x)
    per_layer = [balance.layer_terms(m, ("switch", "z")) for m in model]
    total = balance.aux_loss(model, {"switch": 0.01, "z": 1e-3, "importance": 0})
    expected = sum(0.01 * t["switch"] + 1e-3 * t["z"] for t in per_layer) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model)
    m = model[0]       # the stored routing is the layer's own, before capacity
    assert torch.equal(m.aux["ids"], route(m.aux["logits"], m.spec)[1])


def test_aux_loss_refusals():
    m = layer()
    with pytest.raises(MoeccError, match="call aux_loss after model\\(x\\) in train mode"):
        balance.aux_loss(m, {"switch": 0.01})
    m.train()(torch.randn(3, 8))
    with pytest.raises(MoeccError, match="unknown aux loss 'balance'"):
        balance.aux_loss(m, {"balance": 1.0})
    with pytest.raises(MoeccError, match="MoE layer l0: the load loss needs noisy top-k"):
        balance.aux_loss(m, {"load": 1.0})
    noisy = layer("topk_softmax", noisy=True).train()
    noisy(torch.randn(6, 8))
    assert balance.aux_loss(noisy, {"load": 1.0, "importance": 1.0}).requires_grad


def test_update_bias_rule_by_hand_and_it_balances():
    m = layer("sigmoid_topk", k=1)
    m.load.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))                      # mean 1
    report = balance.update_bias(m, rate=0.1)
    torch.testing.assert_close(m.correction_bias.data, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    assert report == {"l0": 3.0} and m.load.sum() == 0
    with pytest.raises(MoeccError, match="bias balancing needs sigmoid-topk routers"):
        balance.update_bias(layer(), 0.1)
    # a router that sends (almost) everything to expert 0; the bias evens the load out, no gradient
    m = layer("sigmoid_topk", k=1).train()
    with torch.no_grad():
        m.router.weight.normal_(0, 0.3)
        m.router.bias = torch.nn.Parameter(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    x = torch.randn(64, 8)
    m(x)
    first = balance.update_bias(m, rate=0.05)["l0"]
    for _ in range(80):
        m(x)
        last = balance.update_bias(m, rate=0.05)["l0"]
    assert first > 3.5 and last < 1.5


def test_noise_and_expert_dropout_only_in_training_temperature_always():
    m = MoE(MoESpec(4, 8, 16, router=RouterSpec("topk_softmax", 2, noisy=True)), learn_temperature=True,
            expert_dropout=0.5)
    x = torch.randn(10, 8)
    with torch.no_grad():
        m.log_temperature.fill_(math.log(2.0))
        torch.testing.assert_close(m.router_logits(x), m.router(x.float()) / 2)
        m.eval()
        assert torch.equal(m(x), m(x))                                    # deterministic
        assert not m.aux
        m.train()
        torch.manual_seed(0)
        a = m(x)
        assert m.aux["noise_std"] is not None and not torch.equal(a, m(x))
    torch.manual_seed(3)
    logits, _ = m._drop_experts(torch.zeros(6, 4), None)
    dropped = logits[0] < -1e30
    assert 0 < int(dropped.sum()) <= 2                                    # never fewer than k kept
    ids = route(logits, m.spec)[1]
    assert not dropped[ids].any()
    with pytest.raises(MoeccError, match="expert dropout must be in"):
        MoE(MoESpec(4, 8, 16), expert_dropout=1.0)


def test_from_graph_gives_trainable_layers_equal_to_the_graph():
    """The experts are perturbed after upcycling (each differs, the router decides): at initialization
    they are identical copies, and modules holding them in any order would equal the graph."""
    model, ex = tiny_gpt.build(dim=32, layers=2, ffn=48)
    c = capture(model, ex)
    upcycle(c.gm, num_experts=4, top_k=2, router_init="random")
    perturb_experts(c.gm, inplace=True)
    modules = from_graph(c.gm)
    assert sorted(modules) == ["blocks.0.ffn", "blocks.1.ffn"]
    assert [m.spec for m in modules.values()] == [s for _, s in moe_nodes(c.gm)]
    for name, m in modules.items():
        model.set_submodule(name, m)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = c.gm(tokens)
        assert (want - perturb_experts(c.gm, seed=1)(tokens)).abs().max() > 1e-2   # routing matters here
        assert_numerically_equal(model(tokens), want, what="eager from_graph vs graph")
