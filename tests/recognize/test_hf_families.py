"""HF transformers MoE families: spec extracted, single block and whole model vs HF eager, torch.export.

Per family two configs (A: dynamic-shape export checked at other batch/seq; B: static export).
Every comparison is against the untouched HF eager model (experts_implementation="eager"), fp32, 1e-4.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import moecc.ops  # noqa: E402,F401  (registers torch.ops.moecc.moe)
from moecc.ops import record_routing  # noqa: E402
from moecc.recognize import RecognizedMoE, recognize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
import hf_moe  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

# (family, config id, overrides, expected: layers, spec fields, a mutation that must break numerics)
CASES = [
    ("mixtral", "A", {}, 2, dict(E=8, k=2, kind="softmax_topk", renorm=True, act="swiglu"),
     {"router.renormalize": False}),
    ("mixtral", "B", dict(num_local_experts=4, num_experts_per_tok=3), 2,
     dict(E=4, k=3, kind="softmax_topk", renorm=True), {"router.top_k": 2}),
    ("qwen2_moe", "A", {}, 2, dict(E=8, k=4, kind="softmax_topk", renorm=False, shared=64, shared_gated=True),
     {"router.renormalize": True}),
    ("qwen2_moe", "B", dict(norm_topk_prob=True, shared_expert_intermediate_size=0, mlp_only_layers=[0]), 1,
     dict(E=8, k=4, renorm=True, shared=0), {"router.renormalize": False}),
    ("qwen3_moe", "A", {}, 2, dict(E=8, k=2, kind="softmax_topk", renorm=True, shared=0),
     {"router.renormalize": False}),
    ("qwen3_moe", "B", dict(norm_topk_prob=False, decoder_sparse_step=2), 1, dict(E=8, k=2, renorm=False),
     {"router.renormalize": True}),
    ("olmoe", "A", {}, 2, dict(E=8, k=2, kind="softmax_topk", renorm=False), {"router.renormalize": True}),
    ("olmoe", "B", dict(norm_topk_prob=True, num_experts_per_tok=3), 2, dict(k=3, renorm=True),
     {"router.renormalize": False}),
    ("deepseek_v3", "A", {}, 2,
     dict(E=8, k=2, kind="sigmoid_topk", renorm=True, scaling=2.5, groups=(4, 2), shared=32, fp32=True),
     {"router.n_groups": 1, "router.topk_groups": 1}),
    ("deepseek_v3", "B", dict(n_shared_experts=0, n_group=1, topk_group=1, norm_topk_prob=False,
                              routed_scaling_factor=1.0, first_k_dense_replace=0, num_hidden_layers=2), 2,
     dict(E=8, k=2, kind="sigmoid_topk", renorm=False, scaling=1.0, groups=(1, 1), shared=0),
     {"router.renormalize": True}),
    ("gpt_oss", "A", {}, 2, dict(E=8, k=2, kind="topk_softmax", act="swiglu_oai", bias=True, interleaved=True,
                                 fp32=False), {"interleaved": False}),
    ("gpt_oss", "B", dict(num_experts_per_tok=4, swiglu_limit=0.5, swiglu_alpha=1.0), 2,
     dict(k=4, kind="topk_softmax", limit=0.5, alpha=1.0), {"act_limit": 7.0}),
    ("switch", "A", {}, 2, dict(E=8, k=1, kind="softmax_topk", renorm=False, act="relu", capacity=2, fp32=True),
     {"router.capacity_per_row": False}),
    ("switch", "B", dict(expert_capacity=64, router_bias=True, num_sparse_encoder_layers=2), 3,
     dict(E=8, k=1, capacity=64), {"router.capacity": 1}),
]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    family, cfg, overrides, layers, expect, mutation = request.param
    hf, inputs = hf_moe.FAMILIES[family](**overrides)
    model, report = recognize(copy.deepcopy(hf))
    return dict(family=family, cfg=cfg, overrides=overrides, hf=hf, inputs=inputs, model=model,
                report=report, layers=layers, expect=expect, mutation=mutation)


def _spec_view(spec) -> dict:
    r = spec.router
    return dict(E=spec.num_experts, k=r.top_k, kind=r.kind, renorm=r.renormalize, act=spec.activation,
                shared=spec.shared_ffn, shared_gated=spec.shared_gated, scaling=r.scaling,
                groups=(r.n_groups, r.topk_groups), fp32=r.fp32, bias=spec.expert_bias,
                interleaved=spec.interleaved, capacity=r.capacity, limit=spec.act_limit, alpha=spec.act_alpha)


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


def _inputs(case, batch, seq):
    return hf_moe.FAMILIES[case["family"]](batch=batch, seq=seq, **case["overrides"])[1]


def test_spec_extracted(case):
    rep = case["report"]
    assert not rep.unrecognized and not rep.refused, rep.summary()
    assert len(rep.recognized) == case["layers"], rep.summary()
    for r in rep.recognized:
        assert r.recognizer == case["family"] and r.spec.name == r.path
        view = _spec_view(r.spec)
        assert {key: view[key] for key in case["expect"]} == case["expect"]
        assert isinstance(case["model"].get_submodule(r.path), RecognizedMoE)
        assert r.probe_error is not None and r.probe_error <= TOL


@pytest.mark.parametrize("tokens", [(1, 1), (2, 7), (3, 16)])
def test_block_matches_hf(case, tokens):
    gen = torch.Generator().manual_seed(sum(tokens))
    for r in case["report"].recognized:
        block, new = case["hf"].get_submodule(r.path), case["model"].get_submodule(r.path)
        x = torch.randn(*tokens, r.spec.hidden, generator=gen)
        with torch.no_grad():
            ref, got = block(x), new(x)
        if isinstance(ref, tuple):                      # GPT-OSS: (y, router scores)
            assert isinstance(got, tuple) and len(got) == len(ref)
            for a, b in zip(ref, got):
                torch.testing.assert_close(b, a, atol=TOL, rtol=0)
        else:
            torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


def test_model_logits_match_hf(case):
    for batch, seq in [(2, 8), (1, 5), (3, 11)]:
        inputs = _inputs(case, batch, seq)
        err = float((_logits(case["model"], inputs) - _logits(case["hf"], inputs)).abs().max())
        assert err <= TOL, f"{case['family']}-{case['cfg']} B={batch} S={seq}: max abs err {err}"


def test_mutated_spec_breaks_numerics(case):
    """The checks above can fail: one changed routing detail moves the logits far past the tolerance."""
    model = copy.deepcopy(case["model"])
    for m in model.modules():
        if isinstance(m, RecognizedMoE):
            m.spec = _mutate(m.spec, case["mutation"])
    err = float((_logits(model, case["inputs"]) - _logits(case["hf"], case["inputs"])).abs().max())
    assert err > 100 * TOL, f"mutation {case['mutation']} only moved the logits by {err}"


def _mutate(spec, changes: dict):
    router = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("router.")}
    top = {k: v for k, v in changes.items() if not k.startswith("router.")}
    return spec.replace(router=dataclasses.replace(spec.router, **router), **top)


def test_switch_capacity_drops_tokens():
    """Config A's capacity (2 slots per expert per sequence) really drops tokens: the rule is exercised."""
    hf, inputs = hf_moe.build_switch()
    model, _ = recognize(hf)
    with record_routing() as records, torch.no_grad():
        model(*inputs)
    assert records and any(bool((r["expert_ids"] < 0).any()) for r in records)


def test_export_one_node_per_moe_layer(case):
    model, inputs = case["model"], case["inputs"]
    dynamic = case["cfg"] == "A"
    shapes = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in inputs) if dynamic else None
    ep = torch.export.export(model, inputs, strict=False, dynamic_shapes=shapes)
    nodes = [n for n in ep.graph.nodes if n.target == torch.ops.moecc.moe.default]
    assert len(nodes) == case["layers"]
    exported = ep.module()
    for batch, seq in ([(2, 8), (1, 3), (3, 11)] if dynamic else [(2, 8)]):
        inputs = _inputs(case, batch, seq)
        with torch.no_grad():
            err = float((exported(*inputs).logits - _logits(case["hf"], inputs)).abs().max())
        assert err <= TOL, f"exported {case['family']}-{case['cfg']} B={batch} S={seq}: {err}"
