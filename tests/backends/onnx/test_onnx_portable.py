"""Portable ONNX (standard ops only): every router kind and activation vs moe_reference, both kernels,
at token counts other than the export example's (dynamic batch and sequence)."""
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from moecc.backends.onnx import kernels
from moecc.errors import MoeccError
from moecc.ops import record_routing
from moecc.routing import dropped_fraction
from numerics import assert_numerically_equal
from onnx_cases import Side, eager, inputs, lower, op_types, run, spec

SPECS = [
    # routers
    spec("softmax_renorm", top_k=2),
    spec("softmax_plain_scaled", top_k=2, renormalize=False, scaling=1.7),
    spec("softmax_grouped", E=8, top_k=3, n_groups=4, topk_groups=2, group_score="max"),
    spec("topk_softmax", kind="topk_softmax", top_k=2),
    spec("sigmoid_groups", E=8, kind="sigmoid_topk", top_k=2, n_groups=4, topk_groups=2, scaling=2.5),
    spec("sigmoid_plain", kind="sigmoid_topk", top_k=2, renormalize=False),
    spec("expert_choice", kind="expert_choice", top_k=2),
    spec("expert_choice_cf", kind="expert_choice", top_k=1, capacity_factor=1.5, scaling=0.5),
    spec("hash", kind="hash", top_k=2),
    spec("topk_unit", kind="topk_unit", top_k=2),
    spec("hierarchical", E=8, kind="hierarchical", top_k=2, n_groups=2, topk_groups=1),
    spec("hierarchical_plain", E=8, kind="hierarchical", top_k=3, n_groups=4, topk_groups=2, renormalize=False),
    spec("capacity_softmax", top_k=2, capacity_factor=0.5),
    spec("capacity_sigmoid", E=8, kind="sigmoid_topk", top_k=2, n_groups=2, topk_groups=1, capacity_factor=0.75),
    spec("capacity_hash", kind="hash", top_k=2, capacity_factor=0.5, scaling=3.0),
    spec("capacity_fixed_per_row", top_k=2, capacity=1, capacity_per_row=True),
    # activations, biases, shared experts
    spec("gelu_bias", act="gelu", top_k=2, expert_bias=True),
    spec("gelu_tanh", act="gelu_tanh", top_k=1),
    spec("silu", act="silu", top_k=2),
    spec("relu2_bias", act="relu2", top_k=2, expert_bias=True),
    spec("swiglu", act="swiglu", top_k=2),
    spec("swiglu_interleaved_bias", act="swiglu", top_k=2, interleaved=True, expert_bias=True),
    spec("geglu", act="geglu", top_k=2),
    spec("geglu_tanh", act="geglu_tanh", top_k=2, interleaved=True),
    spec("swiglu_clamp", act="swiglu_clamp", top_k=2, act_limit=0.8),
    spec("swiglu_softcap", act="swiglu_softcap", top_k=2, act_limit=0.7, act_alpha=1.5),
    spec("swiglu_oai", act="swiglu_oai", top_k=2, interleaved=True, expert_bias=True, act_limit=0.8),
    spec("shared", act="relu", top_k=2, shared_ffn=5),
    spec("shared_gated_swiglu", act="swiglu", top_k=2, shared_ffn=5, shared_gated=True),
]
CAPACITY = [i for i, s in enumerate(SPECS) if s.name.startswith("capacity")]
NAMED = {s.name: s for s in SPECS}
EXAMPLE, OTHERS = (2, 3), [(3, 5), (1, 1), (1, 9)]


@pytest.fixture(scope="module")
def model():
    return Side(SPECS)


@pytest.fixture(scope="module", params=["onnx.dense_masked", "onnx.gather"])
def lowered(request, model, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    low, path = lower(model, inputs(*EXAMPLE), out, onnx_moe="portable", onnx_kernel=request.param)
    return request.param, low, path


def test_every_layer_takes_the_requested_kernel_and_only_standard_ops(lowered):
    kernel, low, path = lowered
    assert [c.kernel for c in low.kernels] == [kernel] * len(SPECS)
    assert [c.layer for c in low.kernels] == [s.name for s in SPECS]
    ops = op_types(path)
    assert {d for d, _ in ops} == {""}, "portable models use the default ONNX domain only"
    assert (("", "ScatterND") in ops) == (kernel == "onnx.gather")


@pytest.mark.parametrize("B,S", [EXAMPLE] + OTHERS)
def test_every_router_and_activation_matches_the_reference(lowered, model, B, S):
    kernel, _, path = lowered
    args = inputs(B, S, seed=B * 31 + S)
    expected = eager(model, args)
    got = run(path, args)
    for s, g, e in zip(SPECS, got, expected):
        assert_numerically_equal(g, e, atol=1e-5, what=f"{kernel} layer {s.name} at {B}x{S} tokens")


def test_standard_onnx_checker_and_a_second_runtime_agree(lowered, model):
    """Portable means portable: the full ONNX checker passes and onnx's own numpy ReferenceEvaluator
    (not onnxruntime) reproduces the reference too."""
    kernel, _, path = lowered
    onnx.checker.check_model(str(path), full_check=True)
    x, ids = inputs(2, 5, seed=3)
    got = ReferenceEvaluator(str(path)).run(None, {"x": x.numpy(), "token_ids": ids.numpy()})
    for s, g, e in zip(SPECS, got, eager(model, (x, ids))):
        assert_numerically_equal(g, e, atol=1e-5, what=f"onnx.reference {kernel} layer {s.name}")


def test_capacity_layers_really_drop_tokens(model):
    """Otherwise the capacity cases above would prove nothing."""
    with record_routing() as records:
        eager(model, inputs(*OTHERS[0], seed=OTHERS[0][0] * 31 + OTHERS[0][1]))
    for i in CAPACITY:
        assert dropped_fraction(records[i]["expert_ids"]) > 0, SPECS[i].name


def test_cost_model_picks_and_records_a_kernel():
    """No forced kernel: the cheaper portable kernel per layer, with the other's cost as the reason."""
    for s in SPECS[:2]:
        small = kernels.choose(s, {}, "portable", tokens=6)
        big = kernels.choose(s, {}, "portable", tokens=100_000)
        assert small.kernel == "onnx.dense_masked"     # tiny T: one batched MatMul beats E small loops
        assert big.kernel == "onnx.gather"             # many tokens: gather does k/E of the FLOPs
        for c in (small, big):
            other = "onnx.gather" if c.kernel == "onnx.dense_masked" else "onnx.dense_masked"
            assert c.rejected[other].startswith("costlier at")
            assert c.rejected["ort.moe_fused"] == "not asked for (--onnx-moe portable)"


def test_two_dim_input_and_the_tokens_option(tmp_path):
    """x [T, H] (no batch dim) exports and runs at another T; options['tokens'] steers the cost model."""
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.side = Side([NAMED["softmax_renorm"], NAMED["capacity_softmax"]])

        def forward(self, x):
            return self.side(x, None)

    m = Flat()
    low, path = lower(m, (torch.randn(5, 8),), tmp_path, onnx_moe="portable", tokens=100_000)
    assert [c.kernel for c in low.kernels] == ["onnx.gather"] * 2
    assert "at 100000 tokens" in low.kernels[0].reason
    x = (torch.randn(11, 8),)
    assert_numerically_equal(run(path, x), eager(m, x), atol=1e-5, what="2-D input")


def test_hash_routing_without_token_ids_is_one_clear_line(tmp_path):
    class NoIds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.side = Side([spec("hash_layer", kind="hash")])

        def forward(self, x):
            return self.side(x, None)

    with pytest.raises(MoeccError, match="MoE layer hash_layer: hash routing needs token ids"):
        lower(NoIds(), (torch.randn(2, 3, 8),), tmp_path)


@pytest.mark.parametrize("combine", ["weight_in_act", "weight_fp32"])
@pytest.mark.parametrize("kernel", ["onnx.dense_masked", "onnx.gather"])
def test_float16_model(tmp_path, kernel, combine):
    """fp16 experts with an fp32 router: within a few fp16 ulps of the fp16 reference, for either
    MoESpec.combine (the weight rounded to fp16 first, or the product taken in fp32)."""
    names = ("softmax_renorm", "sigmoid_groups", "capacity_softmax", "swiglu")
    m = Side([NAMED[n].replace(combine=combine) for n in names]).half()
    x, ids = inputs(2, 3)
    _, path = lower(m, (x.half(), ids), tmp_path, onnx_moe="portable", onnx_kernel=kernel)
    x, ids = inputs(3, 5, seed=2)
    assert_numerically_equal(run(path, (x.half(), ids)), eager(m, (x.half(), ids)), atol=4e-3, rtol=4e-3,
                             what=f"float16 {kernel}")
