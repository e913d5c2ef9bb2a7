"""Experts modules outside transformers' ExpertsInterface, adapted while capturing (experts_adapters.py).

Tiny DBRX, LongCat-Flash, JetMoE, Doge and Llama 4 causal LMs (samples/coverage_models.py, fp32, HF eager) captured
by moecc: every MoE layer is one moecc::experts node, the graph equals HF eager at token counts the
example did not have (1e-5), the user's model is unchanged afterwards, and exchanging two experts in
the captured program breaks the match. LongCat's check input routes tokens to its identity experts, so
the zero-expert term is exercised. JetMoE's mixture of attention (no FFN MoE) is rewritten without its
router's .tolist() and matches too. A gate moecc cannot express is refused with the reason.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moecc.frontend import capture  # noqa: E402
from moecc.recognize import experts_adapters as xa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
import coverage_models as cm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-5
EXPERTS = torch.ops.moecc.experts.default
LAYERS = {"dbrx": ("DbrxExperts", 2), "longcat_flash": ("LongcatFlashExperts", 1), "jetmoe": ("JetMoeMoE", 2),
          "doge": ("DogeCDMoE", 2), "llama4": ("Llama4TextMoe", 2)}
MODEL_TYPE = {"llama4": "llama4_text"}          # the text model (the "llama4" config is the multimodal one)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(seed, batch, seq):
    return torch.randint(2, cm.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _experts_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is EXPERTS]


@pytest.fixture(scope="module", params=sorted(LAYERS))
def captured(request):
    hf, inputs = cm.build(MODEL_TYPE.get(request.param, request.param))
    if not any(xa.is_adapted(m) for m in hf.modules() if type(m).__name__ == LAYERS[request.param][0]):
        pytest.skip(f"this transformers puts {LAYERS[request.param][0]} behind its ExpertsInterface, which "
                    f"captures it (tests/recognize/test_experts_interface.py)")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    cap = capture(hf, inputs, source=request.param)
    return request.param, hf, state, cap


def test_adapter_captures_every_layer_and_matches_hf(captured):
    family, hf, state, cap = captured
    cls, layers = LAYERS[family]
    report = cap.recognized["experts_adapters"]
    assert [c["source_class"] for c in report["captured"]] == [cls] * layers, report
    # JetMoE's mixture of attention: no moecc node, rewritten as static-shape ops (no .tolist()), said so
    moa = [f"model.layers.{i}.self_attention.experts" for i in range(layers)] if family == "jetmoe" else []
    assert [r["path"] for r in report["refused"]] == moa, report
    assert all("mixture of attention" in r["reason"] for r in report["refused"])
    nodes = _experts_nodes(cap.gm)
    assert len(nodes) == layers
    for node in nodes:
        spec = node.meta["moecc.spec"]
        E, act, F = (16, "silu", 1) if family == "doge" else (8, "swiglu", spec.ffn)   # Doge: one-neuron experts
        assert spec.num_experts == E and spec.activation == act and spec.ffn == F and not spec.interleaved
        assert spec.router.top_k == (1 if family == "llama4" else 2)      # Llama 4: one slot per (token, slot) row
    # the user's model is put back: its own forward and weights, bit for bit
    assert not any(k in vars(m) for m in hf.modules() for k in ("forward", "map", "reduce"))
    after = hf.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    for seed, (batch, seq) in enumerate([(1, 5), (3, 11), (1, 1)]):
        ids = _ids(seed, batch, seq)
        torch.testing.assert_close(_logits(cap.gm, ids), _logits(hf, ids), atol=TOL, rtol=0)


def test_swapped_experts_break_the_match(captured):
    """The comparison above can fail: the experts' output weights rolled by one in the captured program."""
    _, hf, _, cap = captured
    gm = copy.deepcopy(cap.gm)
    w_out = gm.get_parameter(_experts_nodes(gm)[0].args[4].target)      # [E, H, F]
    with torch.no_grad():
        w_out.copy_(w_out.roll(1, 0))
    ids = _ids(0, 2, 8)
    err = float((_logits(gm, ids) - _logits(hf, ids)).abs().max())
    assert err > 100 * TOL, err


def test_longcat_check_input_reaches_the_identity_experts(captured):
    """Tokens of the check input go to zero-compute experts (ids >= E), so dropping their term fails."""
    family, hf, _, _ = captured
    if family != "longcat_flash":
        pytest.skip("LongCat only")
    seen = []
    experts = next(m for m in hf.modules() if type(m).__name__ == "LongcatFlashExperts")
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        _logits(hf, _ids(0, 1, 5))
    finally:
        handle.remove()
    assert int((seen[0] >= experts.num_routed_experts).sum()) > 0


def test_a_gate_moecc_cannot_express_is_refused_and_runs_as_ordinary_ops():
    """relu(gate) · up (no MoESpec activation): refused with the reason; inside capturing the module
    runs gathered ordinary ops that equal its own loop and export without a moecc node."""
    from transformers.models.dbrx.modeling_dbrx import DbrxExperts
    cfg = cm.config("dbrx").ffn_config
    cfg.ffn_act_fn = {"name": "relu"}
    torch.manual_seed(0)
    ex = DbrxExperts(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, cfg.hidden_size, generator=g)
    ids = torch.randint(0, 8, (10, 2), generator=g)
    w = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        want = ex(x, ids, w)
        with xa.capturing(ex) as report:
            got = ex(x, ids, w)
            ep = torch.export.export(ex, (x, ids, w), strict=False)
    assert not report.captured and len(report.refused) == 1
    assert "ReLU" in report.refused[0][1] and "equals no MoESpec activation" in report.refused[0][1]
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert not any(n.target is EXPERTS for n in ep.graph.nodes)
    assert "forward" not in vars(ex) and tuple(ex.mlp.w1.shape) == (8 * cfg.ffn_hidden_size, cfg.hidden_size)


def test_exported_program_runs_at_odd_token_counts(captured):
    """The torch artifact is the re-exported program with its guards: it must take 1×5 and 1×1 (Doge's
    router view made export guard B·S even until the view was taken of the flat logits)."""
    _, hf, _, cap = captured
    gm = cap.export().module()
    for seed, (batch, seq) in enumerate([(1, 5), (1, 1)]):
        ids = _ids(seed, batch, seq)
        torch.testing.assert_close(_logits(gm, ids), _logits(hf, ids), atol=TOL, rtol=0)
