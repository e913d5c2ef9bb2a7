"""transformers experts captured through its ExpertsInterface: one moecc::experts node per layer.

The tiny HF models of samples/hf_moe.py captured with no recognizers (so the interface path takes every
layer): the exported graph equals HF eager (fp32 1e-5 at token counts the example did not have; bf16
bit for bit where today's recognizers are), swapping two experts' weights in the captured program
breaks it, and a gate moecc cannot express is refused with its reason while the layer stays ordinary
ops that still export and still match.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moecc.frontend import capture  # noqa: E402
from moecc.recognize import Registry  # noqa: E402
from moecc.recognize import experts_interface as xi  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
import hf_moe  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
TOL = 1e-5
EXPERTS = torch.ops.moecc.experts.default
NONE = Registry()        # no recognizers: the interface captures every layer


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(seed, batch, seq):
    return torch.randint(0, hf_moe.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _experts_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is EXPERTS]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def captured(request):
    hf, inputs = hf_moe.FAMILIES[request.param]()
    return request.param, hf, capture(copy.deepcopy(hf), inputs, recognizers=NONE)


def test_interface_captures_every_layer_and_matches_hf(captured):
    family, hf, cap = captured
    nodes = _experts_nodes(cap.gm)
    report = cap.recognized["experts_interface"]
    assert len(nodes) == 2 and len(report["captured"]) == 2 and not report["refused"], report
    assert not any(n.target is torch.ops.moecc.moe.default for n in cap.gm.graph.nodes)
    for node in nodes:
        spec = node.meta["moecc.spec"]
        assert spec.num_experts == 8 and spec.name.endswith(".experts")
        assert spec.activation == ("swiglu_oai" if family == "gpt_oss" else "swiglu")
        assert spec.interleaved == (family == "gpt_oss") and spec.expert_bias == (family == "gpt_oss")
    assert hf.config._experts_implementation == "eager"          # the user's model is put back
    for seed, (batch, seq) in enumerate([(1, 5), (3, 11), (1, 1)]):
        ids = _ids(seed, batch, seq)
        torch.testing.assert_close(_logits(cap.gm, ids), _logits(hf, ids), atol=TOL, rtol=0)


def test_swapped_experts_break_the_match(captured):
    """The comparison above can fail: two experts' output weights exchanged in the captured program."""
    _, hf, cap = captured
    gm = copy.deepcopy(cap.gm)
    w_out = gm.get_parameter(_experts_nodes(gm)[0].args[4].target)      # [E, H, F]
    with torch.no_grad():
        w_out[[0, 1]] = w_out[[1, 0]].clone()
    ids = _ids(0, 2, 8)
    err = float((_logits(gm, ids) - _logits(hf, ids)).abs().max())
    assert err > 100 * TOL, err


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_bf16_bit_exact(family, monkeypatch):
    """In bfloat16 the rounding order shows: the interface path equals HF eager bit for bit (combine
    taken from the routing weights' dtype), here run eagerly inside the capture context. Where the
    routing weights are float32 (Mixtral, DeepSeek-V3: combine="weight_fp32") the other rule is visibly
    different; with bf16 weights both rules round the same product."""
    hf, _ = hf_moe.FAMILIES[family]()
    hf = hf.to(torch.bfloat16)
    model = copy.deepcopy(hf)
    ids = _ids(3, 2, 7)
    want = _logits(hf, ids)
    with xi.capturing(model) as report:
        got = _logits(model, ids)
    assert len(report.captured) == 2
    assert torch.equal(got, want)
    if {p.spec.combine for p in report.captured} != {"weight_fp32"}:
        return
    flip = {"weight_fp32": "weight_in_act", "weight_in_act": "weight_fp32"}
    right = xi.combine
    monkeypatch.setattr(xi, "combine", lambda act, w: flip[right(act, w)])
    with xi.capturing(model):
        assert not torch.equal(_logits(model, ids), want)


def test_bf16_exported_bit_exact():
    hf, inputs = hf_moe.build_mixtral()
    hf = hf.to(torch.bfloat16)
    cap = capture(copy.deepcopy(hf), inputs, recognizers=NONE)
    assert [n.meta["moecc.spec"].combine for n in _experts_nodes(cap.gm)] == ["weight_fp32"] * 2
    ids = _ids(5, 1, 9)
    assert torch.equal(_logits(cap.gm, ids), _logits(hf, ids))


def test_refused_gate_gives_its_reason_and_stays_ordinary_ops():
    """A gate no MoESpec activation equals (tanh) on layer 0: refused with the reason, that layer runs
    transformers' batched_mm ops (exportable), layer 1 is still one moecc::experts node."""
    hf, inputs = hf_moe.build_mixtral()
    hf.model.layers[0].mlp.experts.act_fn = torch.nn.Tanh()
    cap = capture(copy.deepcopy(hf), inputs, recognizers=NONE)
    report = cap.recognized["experts_interface"]
    assert [r["path"] for r in report["refused"]] == ["model.layers.0.mlp.experts"]
    assert "_apply_gate of MixtralExperts" in report["refused"][0]["reason"]
    assert "equals no MoESpec activation" in report["refused"][0]["reason"]
    assert [c["path"] for c in report["captured"]] == ["model.layers.1.mlp.experts"]
    assert len(_experts_nodes(cap.gm)) == 1
    assert any(n.target is torch.ops.aten.bmm.default for n in cap.gm.graph.nodes)     # batched_mm
    ids = _ids(1, 1, 5)
    torch.testing.assert_close(_logits(cap.gm, ids), _logits(hf, ids), atol=TOL, rtol=0)


def test_post_expert_norm_is_refused():
    hf, _ = hf_moe.build_mixtral()
    ex = hf.model.layers[0].mlp.experts
    ex.has_post_expert_norm = True
    with pytest.raises(Exception, match="has_post_expert_norm"):
        xi.plan_experts(ex, "layer0")


@pytest.mark.parametrize("act, want", [("relu2", "relu2"), ("relu", "relu")])
def test_ungated_squared_relu_experts_are_one_node(act, want):
    """Nemotron-H's ungated experts (act relu² = torch.square(relu)): planned as "relu2", and the
    moecc::experts call equals the module's own loop; the probe tells relu² from relu."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    cfg = NemotronHConfig(hidden_size=16, moe_intermediate_size=12, n_routed_experts=4, mlp_hidden_act=act)
    torch.manual_seed(0)
    ex = NemotronHExperts(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)
    plan = xi.plan_experts(ex, "experts")
    assert plan.spec.activation == want and not plan.spec.gated
    x = torch.randn(7, 16)
    ids = torch.randint(0, 4, (7, 2))
    weights = torch.rand(7, 2)
    with torch.no_grad():
        want_y = ex(x, ids, weights)
        setattr(ex, xi.MARK, plan)
        try:
            got = xi.experts_forward(ex, x, ids, weights)
        finally:
            delattr(ex, xi.MARK)
            delattr(ex, xi.TRACED)
    torch.testing.assert_close(got, want_y, atol=TOL, rtol=0)
