"""The canonical op: reference semantics, autograd, one node under torch.export, save/load."""
import pytest
import torch

from moecc.nn import MoE
from moecc.ops import call_moe, ffn, moe_reference, record_routing
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal

ACTS = ["relu", "relu2", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "swiglu_oai", "swiglu_clamp", "swiglu_softcap"]


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


def _hand_loop_bf16(x, logits, w_in, b_in, w_out, b_out, spec):
    """Hand-written HF-style eager loop in bfloat16: top-k of the fp32 softmax (renormalized), each
    expert's rows through x @ Wᵀ [+ b], the weight applied in fp32 ("weight_fp32", Mixtral) or
    rounded to bf16 first ("weight_in_act", Qwen-MoE), index_add_ into bf16 zeros in expert order."""
    probs = torch.softmax(logits.float(), -1)
    top, ids = probs.topk(spec.top_k, -1)
    top = top / top.sum(-1, keepdim=True)
    if spec.combine == "weight_in_act":
        top = top.to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(spec.num_experts):
        tok, slot = torch.where(ids == e)
        h = x[tok] @ w_in[e].t()
        h = h if b_in is None else (h + b_in[e] if spec.bias_add == "after_gemm" else torch.addmm(b_in[e], x[tok], w_in[e].t()))
        a = torch.nn.functional.silu(h[:, :spec.ffn]) * h[:, spec.ffn:]
        o = a @ w_out[e].t()
        o = o if b_out is None else (o + b_out[e] if spec.bias_add == "after_gemm" else torch.addmm(b_out[e], a, w_out[e].t()))
        y.index_add_(0, tok, (o * top[tok, slot, None]).to(x.dtype))
    return y


@pytest.mark.parametrize("combine", ["weight_in_act", "weight_fp32"])
@pytest.mark.parametrize("bias_add", [None, "in_gemm", "after_gemm"])
def test_reference_combine_and_bias_add_in_bf16_match_a_hand_loop(combine, bias_add):
    """MoESpec.combine / bias_add: bit-exact against the loop they describe, and (for bf16 data where
    they matter) not equal to the other choice — so each one is really exercised."""
    torch.manual_seed(0)
    E, H, Fw, T = 6, 32, 24, 40
    spec = MoESpec(num_experts=E, hidden=H, ffn=Fw, activation="swiglu", router=RouterSpec(top_k=3),
                   expert_bias=bias_add is not None, bias_add=bias_add or "in_gemm", combine=combine)
    bf = torch.bfloat16
    x, logits = torch.randn(T, H).to(bf), torch.randn(T, E).to(bf)
    w_in, w_out = (torch.randn(E, 2 * Fw, H) * 0.3).to(bf), (torch.randn(E, H, Fw) * 0.3).to(bf)
    b_in, b_out = ((torch.randn(E, 2 * Fw).to(bf), torch.randn(E, H).to(bf)) if bias_add else (None, None))
    got = moe_reference(x, logits, w_in, w_out, b_in, b_out, None, None, None, None, None, spec)
    assert got.dtype == bf
    assert torch.equal(got, _hand_loop_bf16(x, logits, w_in, b_in, w_out, b_out, spec))
    other = spec.replace(combine="weight_fp32" if combine == "weight_in_act" else "weight_in_act")
    assert not torch.equal(got, moe_reference(x, logits, w_in, w_out, b_in, b_out, None, None, None, None, None, other))
    if bias_add:
        flip = spec.replace(bias_add="in_gemm" if bias_add == "after_gemm" else "after_gemm")
        assert not torch.equal(got, moe_reference(x, logits, w_in, w_out, b_in, b_out, None, None, None, None, None, flip))
    f32 = [t if t is None else t.float() for t in (x, logits, w_in, w_out, b_in, b_out)]
    assert torch.equal(moe_reference(*f32, None, None, None, None, None, spec),     # float32: no difference
                       moe_reference(*f32, None, None, None, None, None, other))


def test_new_spec_fields_keep_old_json():
    """combine / bias_add at their defaults are left out of the JSON (spec keys, manifests unchanged);
    old JSON without them loads with the defaults; unknown values are refused."""
    spec = MoESpec(num_experts=4, hidden=8, ffn=8)
    assert "combine" not in spec.to_json() and "bias_add" not in spec.to_json()
    assert MoESpec.from_json(spec.to_json()) == spec
    changed = spec.replace(combine="weight_fp32", bias_add="after_gemm")
    assert MoESpec.from_json(changed.to_json()) == changed
    with pytest.raises(Exception, match="combine"):
        spec.replace(combine="fp16").validate()
    with pytest.raises(Exception, match="bias_add"):
        spec.replace(bias_add="never").validate()
