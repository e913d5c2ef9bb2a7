"""The fused com.microsoft::MoE: taken exactly where its semantics match (numerics vs the reference,
chained between other nodes), refused with the reason everywhere else, and the onnxruntime facts
those rules rest on (checked on single-node models, so a new onnxruntime that changes them shows)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from moecc.backends.onnx import fused, kernels
from moecc.backends.onnx.runtime import session
from moecc.errors import MoeccError
from moecc.nn import MoE
from moecc.ops import moe_reference
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal
from onnx_cases import Side, eager, inputs, lower, op_types, randomized, run, spec

FUSABLE = [
    spec("relu_k2", top_k=2),
    spec("relu_k1_plain", top_k=1, renormalize=False),
    spec("silu_kE_plain", act="silu", top_k=4, renormalize=False),
    spec("gelu_tanh_bias", act="gelu_tanh", top_k=2, expert_bias=True),
    spec("topk_softmax", kind="topk_softmax", top_k=2, act="silu"),
    spec("swiglu", act="swiglu", top_k=2, expert_bias=True),
    spec("swiglu_interleaved", act="swiglu", top_k=2, interleaved=True),
    spec("swiglu_oai", act="swiglu_oai", top_k=2, interleaved=True, expert_bias=True, act_limit=0.8, act_alpha=1.3),
    spec("swiglu_oai_concat", act="swiglu_oai", top_k=2, act_limit=0.8),
    spec("scaled_shared_gated", top_k=2, scaling=1.7, shared_ffn=5, shared_gated=True),
]

REFUSED = [  # (spec, words the reason must contain)
    (spec("exact_gelu", act="gelu"), "tanh approximation"),
    (spec("geglu", act="geglu"), "geglu"),
    (spec("relu2", act="relu2"), "relu2"),
    (spec("geglu_tanh", act="geglu_tanh"), "geglu_tanh"),
    (spec("swiglu_clamp", act="swiglu_clamp"), "clamped swiglu"),
    (spec("swiglu_softcap", act="swiglu_softcap"), "soft-capped"),
    (spec("sigmoid", kind="sigmoid_topk", top_k=2), "sigmoid_topk"),
    (spec("sigmoid_plain", kind="sigmoid_topk", top_k=2, renormalize=False), "sigmoid_topk"),
    (spec("expert_choice", kind="expert_choice"), "expert_choice"),
    (spec("hash", kind="hash"), "hash"),
    (spec("topk_unit", kind="topk_unit"), "topk_unit"),
    (spec("hierarchical", E=8, kind="hierarchical", n_groups=2), "hierarchical"),
    (spec("grouped", E=8, top_k=2, n_groups=4, topk_groups=2), "group-limited"),
    (spec("capacity", top_k=2, capacity_factor=1.0), "capacity"),
    (spec("fixed_capacity", top_k=2, capacity=3), "capacity"),
]


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory):
    model = Side(FUSABLE)
    low, path = lower(model, inputs(2, 3), tmp_path_factory.mktemp("fused"), onnx_moe="fused")
    return model, low, path


def test_fusable_layers_all_take_the_fused_op(fused_model):
    _, low, path = fused_model
    assert [c.kernel for c in low.kernels] == ["ort.moe_fused"] * len(FUSABLE)
    assert op_types(path).count(("com.microsoft", "MoE")) == len(FUSABLE)
    assert low.notes["opset_imports"]["com.microsoft"] == 1


@pytest.mark.parametrize("B,S", [(2, 3), (3, 7), (1, 1), (1, 0), (0, 2)])   # 0 tokens: reshapes allowzero
def test_fused_matches_the_reference(fused_model, B, S):
    model, _, path = fused_model
    args = inputs(B, S, seed=B + S)
    for s, g, e in zip(FUSABLE, run(path, args), eager(model, args)):
        assert_numerically_equal(g, e, atol=1e-5, what=f"fused layer {s.name} at {B}x{S}")


class Chain(nn.Module):
    """Linear -> [LayerNorm -> MoE + residual] x 3 -> Linear: the fused op between other nodes."""

    def __init__(self, specs):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in specs)
        self.moes = nn.ModuleList(randomized(MoE(s), i) for i, s in enumerate(specs))

    def forward(self, x):
        h = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.out(torch.relu(h))


def test_chained_fused_layers_match_and_auto_mixes_kernels(tmp_path):
    """onnxruntime issue 33866 reported wrong values for the fused op chained between other nodes:
    a chain, run repeatedly at several token counts with 1 and 2 threads, must match eager."""
    specs = [spec("a", top_k=2), spec("b_exact_gelu", act="gelu", top_k=2), spec("c", act="swiglu", top_k=1)]
    model = Chain(specs).eval()
    low, path = lower(model, (torch.randn(2, 3, 8),), tmp_path, onnx_moe="auto")
    kinds = [c.kernel for c in low.kernels]                       # fused at decode, by token bucket
    assert kinds[0].startswith("onnx.by_tokens:ort.moe_fused@") and kinds[2].startswith("onnx.by_tokens:ort.moe_fused@")
    assert "ort.moe_fused" not in kinds[1]
    assert "tanh approximation" in low.kernels[1].rejected["ort.moe_fused"]
    for threads in (1, 2):
        sess = session(path, threads)
        for B, S in [(3, 5), (1, 1), (4, 33), (3, 5)]:
            x = torch.randn(B, S, 8)
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            assert_numerically_equal(got[0], eager(model, (x,))[0], atol=1e-5, what=f"chain {B}x{S} t={threads}")


@pytest.mark.parametrize("s,words", REFUSED, ids=[s.name for s, _ in REFUSED])
def test_fused_is_refused_with_the_reason(s, words):
    why = fused.refusal(s)
    assert why is not None and words in why
    auto = kernels.choose(s, {}, "auto", tokens=16)
    assert auto.kernel in ("onnx.dense_masked", "onnx.gather")
    assert auto.rejected["ort.moe_fused"] == why
    with pytest.raises(MoeccError, match=f"MoE layer {s.name}: .*{words}.*--onnx-moe auto"):
        kernels.choose(s, {}, "fused", tokens=16)


def test_fused_is_refused_for_float16_and_odd_logits():
    s = FUSABLE[0]
    assert "only float32 is exact" in kernels.checker("ort.moe_fused", s, {"x": ((None, None, 8), "float16")})
    assert "5 logits for 4 experts" in kernels.checker("ort.moe_fused", s, {"logits": ((None, 5), "float32")})
    assert kernels.checker("ort.moe_fused", s, {"x": ((None, 8), "float32"), "logits": ((None, 4), "float32")})


def test_schema_registration_is_idempotent_and_copies_onnxruntime():
    fused.register_schema()
    fused.register_schema()
    schema = onnx.defs.get_schema("MoE", 1, "com.microsoft")
    assert [i.name for i in schema.inputs][:6] == ["input", "router_probs", "fc1_experts_weights",
                                                    "fc1_experts_bias", "fc2_experts_weights", "fc2_experts_bias"]
    assert {"k", "activation_type", "normalize_routing_weights", "swiglu_fusion"} <= set(schema.attributes)


# ---------------------------------------------------------------- onnxruntime facts, one node at a time

E, H, F, T = 4, 8, 6, 9


def _single_node(names=("x", "r", "w1", "b1", "w2", "b2"), **attrs):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n]
    node = helper.make_node("MoE", names, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run_single(model, feed, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    return session(tmp_path / "m.onnx", 1).run(None, feed)[0]


def _case(s: MoESpec, seed=0):
    g = np.random.default_rng(seed)
    a = lambda *shape: g.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(x=a(T, H), r=a(T, E), w1=a(E, s.in_rows, H) * .5, b1=a(E, s.in_rows) * .5, w2=a(E, H, F) * .5,
                b2=a(E, H) * .5)


def _ref(s: MoESpec, f):
    t = {k: torch.from_numpy(v) for k, v in f.items()}
    return moe_reference(t["x"], t["r"], t["w1"], t["w2"], t["b1"], t["b2"], None, None, None, None, None, s).numpy()


def test_fact_gelu_is_the_tanh_approximation(tmp_path):
    f = _case(spec("g", act="gelu_tanh"))
    y = _run_single(_single_node(k=2, activation_type="gelu", normalize_routing_weights=1), f, tmp_path)
    assert np.abs(y - _ref(spec("g", act="gelu_tanh"), f)).max() < 1e-5
    assert np.abs(y - _ref(spec("g", act="gelu"), f)).max() > 1e-4


def test_fact_old_in_out_weight_layout_runs_and_is_wrong(tmp_path):
    """(E, in, out) weights are accepted when the dims allow it and give wrong numbers: never transpose."""
    s = MoESpec(E, H, H, "relu", RouterSpec(top_k=2))
    f = _case(s)
    f.update(w2=np.random.default_rng(1).standard_normal((E, H, H)).astype(np.float32) * .5)
    m = _single_node(k=2, activation_type="relu", normalize_routing_weights=1)
    right = _run_single(m, f, tmp_path)
    old = _run_single(m, dict(f, w1=f["w1"].transpose(0, 2, 1).copy(), w2=f["w2"].transpose(0, 2, 1).copy()), tmp_path)
    assert np.abs(right - _ref(s, f)).max() < 1e-5
    assert np.abs(old - _ref(s, f)).max() > 1e-2


def test_fact_cpu_swiglu_must_be_interleaved_no_geglu_no_fc3(tmp_path):
    sw = spec("s", act="swiglu")
    with pytest.raises(Exception, match="interleaved|swiglu_fusion"):
        _run_single(_single_node(k=2, activation_type="swiglu", swiglu_fusion=2), _case(sw), tmp_path)
    with pytest.raises(Exception, match="geglu"):
        _run_single(_single_node(k=2, activation_type="geglu", swiglu_fusion=1), _case(sw), tmp_path)
    f = _case(spec("s", act="silu"))
    f["w3"] = f["w1"]
    with pytest.raises(Exception, match="FC3 is not implemented"):
        _run_single(_single_node(("x", "r", "w1", "b1", "w2", "b2", "w3"), k=2, activation_type="silu"), f, tmp_path)


def test_auto_selects_by_the_planned_token_count():
    """--onnx-moe auto: the fused op where it is exact AND the cheapest at the planned T (decode), the
    portable gather from a few tokens on (measured on the bench's shapes: the fused op re-reads an
    expert's weights per token at T=8 and is 1.2-2x slower from T=8 to 512)."""
    from moecc.bench.grid import SHAPES
    for s in SHAPES.values():
        decode = kernels.choose(s, {}, "auto", tokens=1)
        assert decode.kernel == "ort.moe_fused" and "cheapest at 1 tokens" in decode.reason
        for T in (8, 64, 512, 2048):
            prefill = kernels.choose(s, {}, "auto", tokens=T)
            assert prefill.kernel == "onnx.gather", (s.name, T)
            assert prefill.rejected["ort.moe_fused"].startswith(f"costlier at {T} tokens")
        assert kernels.choose(s, {}, "fused", tokens=2048).kernel == "ort.moe_fused"      # asked for
        assert kernels.choose(s, {}, "portable", tokens=1).kernel == "onnx.gather"


def test_auto_dispatches_by_token_count_at_run_time(tmp_path):
    """--onnx-moe auto without a planned token count: ONE artifact whose If on T runs the fused op at
    decode and the portable gather at prefill, matching the reference on both sides of the boundary;
    options['tokens'] plans one kernel instead."""
    from moecc.bench.grid import SHAPES
    for s in SHAPES.values():
        c = kernels.choose(s, {}, "auto", 64, dispatch_by_tokens=True)
        (small, T), (large, end) = kernels.buckets_of(c.kernel)
        assert (small, large, end) == ("ort.moe_fused", "onnx.gather", None) and 2 <= T <= 8, c.kernel
    s = spec("swiglu", act="swiglu", top_k=2, expert_bias=True)
    model = Side([s, spec("exact_gelu", act="gelu")])
    low, path = lower(model, inputs(2, 3), tmp_path / "auto", onnx_moe="auto")
    plan = kernels.buckets_of(low.kernels[0].kernel)
    assert plan[0][0] == "ort.moe_fused" and len(plan) >= 2 and "run-time dispatch" in low.kernels[0].reason
    assert ("", "If") in op_types(path) and ("com.microsoft", "MoE") not in op_types(path)   # inside the If
    for B, S in [(1, 1), (1, plan[0][1] - 1), (1, plan[0][1]), (3, 70)]:
        args = inputs(B, S, seed=S)
        for name, g, e in zip(("swiglu", "exact_gelu"), run(path, args), eager(model, args)):
            assert_numerically_equal(g, e, atol=1e-5, what=f"{name} at {B}x{S}")
    low, _ = lower(model, inputs(2, 3), tmp_path / "planned", onnx_moe="auto", tokens=1)
    assert low.kernels[0].kernel == "ort.moe_fused"
