"""upcycle: structure, refusals (negative cases), numerics (upcycled at init == dense), properties."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tiny_bert
import tiny_gpt
from moecc.frontend import capture
from moecc.errors import MoeccError
from moecc.passes.canonicalize import canonicalize
from moecc.passes.ffn_match import find_ffns
from moecc.passes.upcycle import upcycle
from moecc.pipeline import moe_nodes
from numerics import assert_numerically_equal


def _captured(model, *inputs):
    c = capture(model.eval(), inputs)
    canonicalize(c.gm)
    return c


def _check_equal_dense(model, c, inputs):
    ep = c.export()
    assert_numerically_equal(ep.module()(*inputs), model(*inputs), atol=2e-5, what="upcycled vs dense")


@pytest.mark.parametrize("build,count,act", [(tiny_gpt.build, 4, "swiglu"), (tiny_bert.build, 3, "gelu")])
def test_samples_upcycle_to_one_moe_node_per_ffn(build, count, act):
    model, ex = build()
    c = _captured(model, *ex)
    res = upcycle(c.gm, num_experts=8, top_k=2, router_init="random")
    assert res.stats == {"ffn_found": count, "ffn_rewritten": count, "refused": 0}
    specs = [s for _, s in moe_nodes(c.gm)]
    assert len(specs) == count and {s.activation for s in specs} == {act}
    assert all(s.num_experts == 8 and s.top_k == 2 for s in specs)
    assert not any(n.target is torch.ops.aten.gelu.default for n in c.gm.graph.nodes)
    fresh = tuple(torch.cat([t, t[:1]], 0)[:, :-3] if t.dim() > 1 else t for t in ex)   # another T
    _check_equal_dense(model, c, fresh)


def test_bert_layer_name_spans_both_modules():
    model, ex = tiny_bert.build()
    c = _captured(model, *ex)
    upcycle(c.gm, num_experts=4, top_k=1)
    names = [s.name for _, s in moe_nodes(c.gm)]
    assert names == ["layer.0", "layer.1", "layer.2"]
    assert all(s.expert_bias for _, s in moe_nodes(c.gm))


class Styles(nn.Module):
    """FFNs written three other ways: Sequential with in-place ReLU, manual matmul + bias, F.silu gated."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(16, 8))
        self.W1, self.b1 = nn.Parameter(torch.randn(12, 8) * 0.3), nn.Parameter(torch.randn(12))
        self.W2 = nn.Parameter(torch.randn(8, 12) * 0.3)
        self.g, self.u, self.d = nn.Linear(8, 10, bias=False), nn.Linear(8, 10, bias=False), nn.Linear(10, 8)

    def forward(self, x):
        x = x + self.seq(x)
        h = x @ self.W1.T + self.b1
        x = x + (h * torch.sigmoid(h)) @ self.W2.t()
        return x + self.d(self.u(x) * F.silu(self.g(x)))


def test_other_styles():
    torch.manual_seed(0)
    model, x = Styles(), torch.randn(2, 5, 8)
    c = _captured(model, x)
    res = upcycle(c.gm, num_experts=4, top_k=2, router_init="random")
    assert res.stats["ffn_rewritten"] == 3
    assert [s.activation for _, s in moe_nodes(c.gm)] == ["relu", "silu", "swiglu"]
    _check_equal_dense(model, c, (torch.randn(3, 4, 8),))


def test_layer_selection():
    model, ex = tiny_gpt.build()
    for layers, want in [("every-2", 2), ("0,3", 2), ("all", 4), ("2", 1)]:
        c = _captured(model, *ex)
        assert upcycle(c.gm, num_experts=4, top_k=1, layers=layers).stats["ffn_rewritten"] == want
    with pytest.raises(MoeccError, match="the model has 4 FFNs"):
        upcycle(_captured(model, *ex).gm, layers="0,7")


# ---- negative: the rule must not fire, and says why -------------------------------------------------

class HiddenUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = F.gelu(self.a(x))
        return self.b(h) + h.sum(-1, keepdim=True)


class NormBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.b(self.n(F.relu(self.a(x))))


class NoFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.a(x), -1)


@pytest.mark.parametrize("model,reason", [
    (HiddenUsedTwice(), "hidden activation is used by 2 nodes"),
    (NormBetween(), "layer_norm.default between the Linears is not elementwise"),
])
def test_refusals(model, reason):
    c = _captured(model, torch.randn(2, 3, 8))
    matches, refusals = find_ffns(c.gm)
    assert not matches and any(reason in r.reason for r in refusals), refusals
    with pytest.raises(MoeccError, match="no dense FFN found.*" + reason.split()[0]):
        upcycle(c.gm)


def test_no_ffn_at_all():
    with pytest.raises(MoeccError, match="no dense FFN found; looked for Linear"):
        upcycle(_captured(NoFFN(), torch.randn(2, 8)).gm)


@pytest.mark.parametrize("E,k,msg", [(1, 1, "at least 2 experts"), (4, 5, "between 1 and E=4"),
                                     (4, 0, "between 1 and E=4")])
def test_bad_expert_counts(E, k, msg):
    with pytest.raises(MoeccError, match=msg):
        upcycle(_captured(NormBetween(), torch.randn(2, 8)).gm, num_experts=E, top_k=k)


# ---- property: any E, k, width, activation, token count: upcycled == dense ---------------------------

class FFN(nn.Module):
    def __init__(self, h, f, act, gated, bias):
        super().__init__()
        self.up, self.down = nn.Linear(h, f, bias=bias), nn.Linear(f, h, bias=bias)
        self.gate = nn.Linear(h, f, bias=bias) if gated else None
        self.act = act

    def forward(self, x):
        h = self.act(self.up(x) if self.gate is None else self.gate(x))
        return self.down(h * self.up(x) if self.gate is not None else h)


@settings(max_examples=6, deadline=None)
@given(E=st.integers(2, 6), k=st.integers(1, 6), h=st.integers(2, 9), f=st.integers(1, 12),
       act=st.sampled_from([F.relu, F.gelu, F.silu]), gated=st.booleans(), bias=st.booleans(),
       tokens=st.integers(1, 9), seed=st.integers(0, 100))
def test_property_upcycled_equals_dense(E, k, h, f, act, gated, bias, tokens, seed):
    torch.manual_seed(seed)
    act = F.silu if gated and act is F.relu else act          # ReGLU is not a gated kind moecc knows
    model = FFN(h, f, act, gated, bias).eval()
    c = _captured(model, torch.randn(2, 3, h))
    upcycle(c.gm, num_experts=E, top_k=min(k, E), router_init="random", seed=seed)
    _check_equal_dense(model, c, (torch.randn(1, tokens, h),))
