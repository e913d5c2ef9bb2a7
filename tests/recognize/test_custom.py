"""The extension point and the never-silently-wrong rules, on samples/custom_moe.py's hand-written blocks."""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import moecc.ops  # noqa: F401
from moecc.errors import MoeccError
from moecc.nn import MoE
from moecc.recognize import (MoEMapping, RecognizedMoE, Recognizer, Registry, UnrecognizedMoEWarning,
                             by_class_name, default_registry, looks_like_moe, recognize)
from moecc.spec import MoESpec, RouterSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
import custom_moe  # noqa: E402

TOL = 1e-4
AUTO = torch.export.Dim.AUTO


def _moe_nodes(ep) -> int:
    return sum(n.target == torch.ops.moecc.moe.default for n in ep.graph.nodes)


@pytest.fixture(scope="module")
def raw():
    model, inputs = custom_moe.build_raw()
    with torch.no_grad():
        ref = model(*inputs)
    return model, inputs, ref


def test_unrecognized_blocks_warn_name_module_and_why(raw):
    model, inputs, ref = raw
    with pytest.warns(UnrecognizedMoEWarning) as caught:
        same, report = recognize(copy.deepcopy(model))
    text = [str(w.message) for w in caught]
    assert any("blocks.0" in t and "MOEFeedForward" in t and "gate.weight" in t and "8 experts" in t for t in text)
    assert any("blocks.1" in t and "ListMoE" in t and "4 experts in experts" in t for t in text)
    assert [p for p, _ in report.unrecognized] == ["blocks.0", "blocks.1"] and not report.recognized
    # capture continues opaque-but-correct: no moe node, same numbers
    ep = torch.export.export(same, inputs)
    assert _moe_nodes(ep) == 0
    torch.testing.assert_close(ep.module()(*inputs), ref, atol=TOL, rtol=0)


def test_unrecognized_error_mode_stops_with_advice(raw):
    with pytest.raises(MoeccError, match=r"blocks\.0.*register a recognizer.*samples/custom_moe\.py"):
        recognize(copy.deepcopy(raw[0]), on_unrecognized="error")


def test_unrecognized_ignore_mode_is_quiet(raw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = recognize(copy.deepcopy(raw[0]), on_unrecognized="ignore")
    assert len(report.unrecognized) == 2


def test_registered_recognizers_capture_both_blocks(raw):
    model, inputs, ref = raw
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrecognizedMoEWarning)
        new, report = recognize(copy.deepcopy(model), custom_moe.recognizers())
    assert [(r.path, r.recognizer) for r in report.recognized] == [("blocks.0", "mapping:MOEFeedForward"),
                                                                    ("blocks.1", "list_moe")]
    s0, s1 = (r.spec for r in report.recognized)
    assert (s0.num_experts, s0.top_k, s0.activation, s0.router.renormalize, s0.router.fp32) == (8, 2, "swiglu", True, False)
    assert (s1.num_experts, s1.top_k, s1.activation, s1.expert_bias, s1.router.renormalize) == (4, 2, "gelu", True, False)
    for tokens in [(1, 1), (2, 8), (3, 13)]:
        ids = torch.randint(0, 128, tokens, generator=torch.Generator().manual_seed(tokens[1]))
        with torch.no_grad():
            torch.testing.assert_close(new(ids), model(ids), atol=TOL, rtol=0)
    ep = torch.export.export(new, inputs, dynamic_shapes=({0: AUTO, 1: AUTO},))
    assert _moe_nodes(ep) == 2
    torch.testing.assert_close(ep.module()(*inputs), ref, atol=TOL, rtol=0)


def test_build_custom_is_ready_for_capture(raw):
    model, inputs = custom_moe.build_custom()
    assert sum(isinstance(m, RecognizedMoE) for m in model.modules()) == 2
    _, report = recognize(model)           # capture's own call: already canonical, nothing to report
    assert not report.recognized and not report.unrecognized


def test_wrong_semantics_are_refused_not_silently_used(raw):
    """A mapping that gets the routing wrong fails the probe: the block stays, with a warning."""
    model, inputs, ref = raw
    wrong = MoEMapping(**{**custom_moe.MOE_FEED_FORWARD.__dict__,
                          "router": RouterSpec("softmax_topk", renormalize=False, fp32=False)})
    with pytest.warns(UnrecognizedMoEWarning, match=r"blocks\.0: recognizer 'mapping:MOEFeedForward' refused"):
        new, report = recognize(copy.deepcopy(model), [wrong, custom_moe.LIST_MOE])
    assert report.refused[0][0] == "blocks.0" and "differs from the block" in report.refused[0][2]
    assert type(new.blocks[0]).__name__ == "MOEFeedForward" and isinstance(new.blocks[1], RecognizedMoE)
    with torch.no_grad():
        torch.testing.assert_close(new(*inputs), ref, atol=TOL, rtol=0)


def test_mapping_with_a_bad_path_names_it(raw):
    bad = MoEMapping(**{**custom_moe.MOE_FEED_FORWARD.__dict__, "w_out": "cond_ffn.w9"})
    with pytest.raises(MoeccError, match=r"no parameter 'cond_ffn\.w9'"):
        recognize(copy.deepcopy(raw[0]), [bad, custom_moe.LIST_MOE], on_unrecognized="error")


def test_registry_is_explicit_and_user_wins():
    a, b = default_registry(), default_registry()
    a.register(custom_moe.LIST_MOE)
    assert "list_moe" in a.names() and "list_moe" not in b.names()          # no global state
    assert len(b) == 7
    mine = Recognizer("my_mixtral", by_class_name("MixtralSparseMoeBlock"), lambda m, p: None)
    a.register(mine)
    fake = type("MixtralSparseMoeBlock", (nn.Module,), {})()
    assert a.match(fake) is mine and b.match(fake).name == "mixtral"
    only_mine = Registry([custom_moe.MOE_FEED_FORWARD])
    assert only_mine.names() == ["mapping:MOEFeedForward"]
    with pytest.raises(MoeccError, match="Recognizer or an MoEMapping"):
        only_mine.register("mixtral")


def test_a_recognizer_must_return_a_moecc_module():
    bad = Recognizer("bad", by_class_name("ListMoE"), lambda block, path: nn.Identity())
    with pytest.warns(UnrecognizedMoEWarning, match="build must return a moecc.nn.MoE"):
        _, report = recognize(custom_moe.ListMoE(), [bad])
    assert report.refused and not report.recognized


def test_model_that_is_a_block_is_replaced_at_the_root():
    torch.manual_seed(0)
    block = custom_moe.ListMoE().eval()
    x = torch.randn(2, 5, 64)
    new, report = recognize(block, [custom_moe.LIST_MOE])
    assert isinstance(new, RecognizedMoE) and report.recognized[0].path == ""
    with torch.no_grad():
        torch.testing.assert_close(new(x), block(x), atol=TOL, rtol=0)


def test_canonical_moe_is_left_alone_and_not_flagged():
    model = nn.Sequential(MoE(MoESpec(num_experts=4, hidden=16, ffn=32)), nn.Linear(16, 16))
    same, report = recognize(model, on_unrecognized="error")
    assert same is model and not report.recognized and not report.unrecognized


def test_detector_needs_a_router_and_experts():
    mlp = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))   # noqa: E731
    dense = nn.Module()
    dense.layers, dense.head = nn.ModuleList(mlp() for _ in range(4)), nn.Linear(8, 4)  # 4 MLPs, 4 outputs
    assert looks_like_moe(dense) is None
    assert looks_like_moe(nn.TransformerEncoderLayer(16, 2)) is None
    moe = nn.Module()
    moe.experts, moe.router = nn.ModuleList(mlp() for _ in range(4)), nn.Linear(8, 4)
    assert looks_like_moe(moe) == "router weight router.weight (4, 8) and 4 experts in experts"
    moe.router = nn.Linear(8, 3)                                                 # 3 != 4 experts
    assert looks_like_moe(moe) is None


def test_recognized_moe_refuses_weights_the_spec_does_not_describe():
    spec = MoESpec(num_experts=4, hidden=8, ffn=16, activation="swiglu", name="layer0")
    with pytest.raises(MoeccError, match=r"layer0: w_in has shape \(4, 16, 8\), the spec expects \(4, 32, 8\)"):
        RecognizedMoE(spec, router_weight=torch.zeros(4, 8), w_in=torch.zeros(4, 16, 8), w_out=torch.zeros(4, 8, 16))
