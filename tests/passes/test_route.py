"""route pass: structure (spec, new tensors, rewiring), numerics against the op called by hand,
upcycle + route == dense (identical experts, weights summing to 1), and refusals naming the layer."""
import dataclasses

import pytest
import torch
from torch import nn

import tiny_gpt
from moecc import passes
from moecc.api import transform
from moecc.frontend import capture
from moecc.errors import MoeccError
from moecc.nn import MoE
from moecc.ops import call_moe
from moecc.passes.route import ROUTER_HELP, route_pass, token_ids_input
from moecc.pipeline import PassManager, moe_nodes
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal

H, E = 8, 4


class Net(nn.Module):
    """tokens [B, S] -> embed -> 2 residual MoE layers -> [B, S, H]."""

    def __init__(self, router=RouterSpec("softmax_topk", 2)):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, H)
        self.layers = nn.ModuleList(MoE(MoESpec(E, H, 16, activation="silu", router=router, name=f"layers.{i}"),
                                      init_std=0.3) for i in range(2))
        for m in self.layers:
            nn.init.normal_(m.router.weight)

    def forward(self, tokens):
        x = self.emb(tokens)
        for m in self.layers:
            x = x + m(x)
        return x


class FloatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = MoE(MoESpec(E, H, 16, name="moe"))

    def forward(self, x):
        return self.moe(x)


TOKENS = torch.tensor([[3, 14, 15, 9, 26], [5, 35, 8, 9, 7]])


def captured(net=None):
    # recognize=False: moecc.nn.MoE layers are already canonical (the recognizer's detector would only
    # warn that the ModuleList of them "looks like an MoE")
    return capture((net or Net()).eval(), (TOKENS,), recognize=False)


def by_hand(net, tokens, spec_of, logits_of, **kw):
    """The model computed with the op called directly: what the rerouted graph must equal."""
    x = net.emb(tokens)
    for m in net.layers:
        s = spec_of(m.spec)
        bias = torch.zeros(E) if s.router.kind == "sigmoid_topk" else None
        ids = tokens if s.router.kind == "hash" else None
        x = x + call_moe(x, logits_of(m, x), m.w_in, m.w_out, s, router_bias=bias, token_ids=ids)
    return x


def with_router(**kw):
    return lambda s: s.replace(router=dataclasses.replace(s.router, **kw))


def flat_logits(m, x):
    return x @ m.router.weight.T


def test_sigmoid_topk_groups_capacity_set_everywhere_with_a_zero_correction_bias():
    net, c = Net(), None
    c = captured(net)
    res = route_pass(c.gm, {"router": "sigmoid-topk", "n_groups": 2, "topk_groups": 1, "scaling": 2.5,
                            "capacity_factor": 1.5, "captured": c, "num_experts": 99})   # extra keys ignored
    assert res.modified and res.stats == {"moe_layers": 2, "rerouted": 2, "tensors_added": 2, "tensors_removed": 0,
                                          "token_ids_wired": 0}
    for node, spec in moe_nodes(c.gm):
        assert node.meta["moecc.spec"] == spec
        r = spec.router
        assert (r.kind, r.top_k, r.n_groups, r.topk_groups, r.scaling, r.capacity_factor) == \
            ("sigmoid_topk", 2, 2, 1, 2.5, 1.5)
        bias = node.args[6]
        assert bias.op == "get_attr" and bias.target.startswith("moecc_route.")
    expected = by_hand(net, TOKENS, with_router(kind="sigmoid_topk", n_groups=2, topk_groups=1, scaling=2.5,
                                                capacity_factor=1.5), flat_logits)
    assert_numerically_equal(c.gm(TOKENS), expected, what="sigmoid-topk")
    assert_numerically_equal(c.export().module()(TOKENS), expected, what="re-exported")
    res = route_pass(c.gm, {"router": "topk-softmax", "n_groups": 1})    # the bias goes with the router
    assert res.stats["tensors_removed"] == 2 and not list(c.gm.moecc_route.buffers())
    assert all(n.args[6] is None for n, _ in moe_nodes(c.gm))


def test_hierarchical_adds_a_group_router_and_back_again():
    net = Net()
    c = captured(net)
    route_pass(c.gm, {"router": "hierarchical", "n_groups": 2, "topk_groups": 1})
    for node, spec in moe_nodes(c.gm):
        assert node.args[1].target is torch.ops.aten.cat.default
        assert node.args[1].meta["val"].shape[-1] == 2 + E                 # G + E logits, groups first

    def hier_logits(m, x):
        w = m.router.weight                                               # [E, H]
        return torch.cat([x @ w.reshape(2, 2, H).mean(1).T, x @ w.T], -1)
    expected = by_hand(net, TOKENS, with_router(kind="hierarchical", n_groups=2, topk_groups=1), hier_logits)
    assert_numerically_equal(c.gm(TOKENS), expected, what="hierarchical")
    res = route_pass(c.gm, {"router": "softmax-topk"})                    # back to a flat router
    assert all(s.router.n_groups == 1 for _, s in moe_nodes(c.gm))
    assert res.stats["tensors_removed"] == 2 and not list(c.gm.moecc_route.parameters())
    assert_numerically_equal(c.gm(TOKENS), net(TOKENS), what="flat again")


def test_hash_wires_the_token_ids_input():
    net = Net()
    c = captured(net)
    res = route_pass(c.gm, {"router": "hash", "top_k": 1})
    assert res.stats["token_ids_wired"] == 2
    tokens = token_ids_input(c.gm)
    assert tokens.op == "placeholder" and all(n.args[10] is tokens for n, _ in moe_nodes(c.gm))
    expected = by_hand(net, TOKENS, with_router(kind="hash", top_k=1), flat_logits)
    assert_numerically_equal(c.gm(TOKENS), expected, what="hash")
    other = torch.tensor([[1, 2, 3]])                                     # another token count
    assert_numerically_equal(c.export().module()(other), by_hand(net, other, with_router(kind="hash", top_k=1),
                                                                 flat_logits), what="hash, fresh tokens")


def test_layer_selection_by_index_and_name():
    c = captured()
    route_pass(c.gm, {"router": "topk-softmax", "layers": "1"})
    assert [s.router.kind for _, s in moe_nodes(c.gm)] == ["softmax_topk", "topk_softmax"]
    route_pass(c.gm, {"router": "expert-choice", "capacity_factor": "2", "layers": "layers.0"})
    assert [s.router.kind for _, s in moe_nodes(c.gm)] == ["expert_choice", "topk_softmax"]
    res = route_pass(c.gm, {"router": "expert-choice", "capacity_factor": 2.0, "layers": ["layers.0"]})
    assert not res.modified                                               # nothing to change
    with pytest.raises(MoeccError, match="no MoE layer named 'layers.7'; the layers are layers.0, layers.1"):
        route_pass(c.gm, {"router": "hash", "layers": "layers.7"})
    with pytest.raises(MoeccError, match="the model has 2 MoE layers"):
        route_pass(c.gm, {"router": "hash", "layers": "2"})


def test_upcycled_tiny_gpt_rerouted_still_equals_dense():
    """Upcycled experts are identical, so any dropless router whose weights sum to 1 gives the dense FFN."""
    model, ex = tiny_gpt.build(dim=32, layers=1, ffn=48)
    with torch.no_grad():
        dense = model(*ex)
    for opts in ({"router": "sigmoid-topk", "n_groups": 2, "topk_groups": 1},
                 {"router": "hierarchical", "n_groups": 2}, {"router": "hash"}):
        c = capture(model, ex)
        pm = transform(c, [("upcycle", {"num_experts": 4, "top_k": 2, "router_init": "random"}), ("route", opts)])
        assert pm.records[-1].stats["rerouted"] == 1
        with torch.no_grad():
            assert_numerically_equal(c.gm(*ex), dense, atol=2e-5, what=str(opts))


@pytest.mark.parametrize("opts,msg", [
    ({"top_k": 5}, "route: MoE layer layers.0: top-k must be in 1..E=4, got k=5"),
    ({"capacity_factor": 0}, "route: MoE layer layers.0: capacity factor must be > 0, got 0"),
    ({"capacity_factor": -1.5}, "route: MoE layer layers.0: capacity factor must be > 0"),
    ({"capacity_factor": "lots"}, "route: MoE layer layers.0: capacity factor 'lots' is not a number"),
    ({"router": "sigmoid-topk", "n_groups": 3}, "route: MoE layer layers.0: n_groups=3 does not divide E=4"),
    ({"router": "sigmoid-topk", "n_groups": 2, "topk_groups": 3}, "layers.0: topk_groups=3 must be in 1..n_groups=2"),
    ({"router": "topk-softmax", "n_groups": 2}, "layers.0: n_groups=2 .* not topk_softmax"),
    ({"router": "hierarchical"}, "layers.0: hierarchical routing needs n_groups ≥ 2"),
    ({"router": "soft-max"}, "route: MoE layer layers.0: unknown router 'soft-max'; choose one of softmax-topk"),
])
def test_bad_settings_name_the_layer_and_the_setting(opts, msg):
    c = captured()
    with pytest.raises(MoeccError, match=msg):
        route_pass(c.gm, opts)


def test_hash_without_token_ids_and_no_moe_layer():
    c = capture(FloatNet().eval(), (torch.randn(2, 3, H),), recognize=False)
    pm = PassManager([("route", passes.make("route", {"router": "hash"}))])
    with pytest.raises(MoeccError, match="pass 'route' failed: route: MoE layer moe: hash routing needs token "
                                         "ids; the model input has none"):
        pm(c.gm)
    dense = capture(nn.Sequential(nn.Linear(H, H)).eval(), (torch.randn(2, H),), recognize=False)
    with pytest.raises(MoeccError, match="route: the model has no MoE layer"):
        route_pass(dense.gm, {"router": "hash"})


def test_router_help_covers_every_kind():
    from moecc.spec import ROUTER_KINDS
    assert {k.replace("_", "-") for k in ROUTER_KINDS} == set(ROUTER_HELP)
    assert all(len(v.splitlines()) == 1 and v for v in ROUTER_HELP.values())
