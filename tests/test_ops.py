"""The canonical op: reference semantics, autograd, one node under torch.export, save/load."""
import pytest
import torch

from moecc.nn import MoE
from moecc.ops import call_moe, ffn, moe_reference, record_routing
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "swiglu_oai"]


def _dense_moe(x, logits, w_in, w_out, spec):
    """Hand-written: every token, every expert, weighted by a dense gate matrix."""
    probs = torch.softmax(logits.float(), -1)
    top, ids = probs.topk(spec.top_k, -1)
    if spec.router.renormalize:
        top = top / top.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, ids, top)                 # [T, E]
    outs = torch.stack([ffn(x, w_in[e], None, w_out[e], None, spec) for e in range(spec.num_experts)], 1)
    return (gates.unsqueeze(-1) * outs).sum(1)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("renorm", [True, False])
def test_reference_matches_dense_formula(act, renorm):
    torch.manual_seed(0)
    spec = MoESpec(num_experts=5, hidden=6, ffn=7, activation=act, router=RouterSpec(top_k=2, renormalize=renorm))
    x, logits = torch.randn(9, 6), torch.randn(9, 5)
    w_in, w_out = torch.randn(5, spec.in_rows, 6), torch.randn(5, 6, 7)
    y = call_moe(x, logits, w_in, w_out, spec)
    assert_numerically_equal(y, _dense_moe(x, logits, w_in, w_out, spec), atol=1e-5)


def test_activation_values_by_hand():
    h = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    spec = MoESpec(num_experts=2, hidden=1, ffn=2, activation="swiglu")
    assert_numerically_equal(moecc_activate(h, spec), torch.nn.functional.silu(h[:, :2]) * h[:, 2:])
    inter = spec.replace(interleaved=True)
    assert_numerically_equal(moecc_activate(h, inter), torch.nn.functional.silu(h[:, ::2]) * h[:, 1::2])
    oai = spec.replace(activation="swiglu_oai", act_limit=2.0)
    gate, up = h[:, :2].clamp(max=2.0), h[:, 2:].clamp(-2.0, 2.0)
    assert_numerically_equal(moecc_activate(h, oai), (up + 1) * gate * torch.sigmoid(1.702 * gate))


def moecc_activate(h, spec):
    from moecc.ops import activate
    return activate(h, spec)


@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_gradcheck(kind):
    torch.manual_seed(0)
    spec = MoESpec(num_experts=4, hidden=3, ffn=4, activation="swiglu", expert_bias=True, shared_ffn=2,
                   shared_gated=True, router=RouterSpec(kind, top_k=2, fp32=False))
    d = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(5, 3, **d), torch.randn(5, 4, **d), torch.randn(4, 8, 3, **d), torch.randn(4, 3, 4, **d),
            torch.randn(4, 8, **d), torch.randn(4, 3, **d), torch.randn(4, 3, **d), torch.randn(3, 2, **d),
            torch.randn(1, 3, **d))
    f = lambda x, lg, wi, wo, bi, bo, swi, swo, sg: call_moe(
        x, lg, wi, wo, spec, b_in=bi, b_out=bo, shared_w_in=swi, shared_w_out=swo, shared_gate=sg)
    assert torch.autograd.gradcheck(f, args)


def test_export_keeps_one_node_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    m = MoE(MoESpec(num_experts=4, hidden=8, ffn=16, activation="geglu")).eval()
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.moecc.moe.default]
    assert len(nodes) == 1
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    x2 = torch.randn(3, 7, 8)                                         # another token count
    assert_numerically_equal(loaded(x2), m(x2), atol=1e-6)


def test_record_routing_sees_every_layer():
    m = MoE(MoESpec(num_experts=4, hidden=8, ffn=16, name="layer0"))
    with record_routing() as records:
        m(torch.randn(3, 8))
    assert len(records) == 1 and records[0]["layer"] == "layer0"
    assert records[0]["expert_ids"].shape == (3, 2)


def test_reference_loop_skips_unrouted_experts():
    spec = MoESpec(num_experts=4, hidden=2, ffn=3, router=RouterSpec(top_k=1))
    logits = torch.tensor([[10.0, 0, 0, 0], [10.0, 0, 0, 0]])           # both tokens → expert 0
    w_in, w_out = torch.randn(4, 3, 2), torch.randn(4, 2, 3)
    w_in[1:] = float("nan")                                             # never read
    y = moe_reference(torch.randn(2, 2), logits, w_in, w_out, None, None, None, None, None, None, None, spec)
    assert torch.isfinite(y).all()
