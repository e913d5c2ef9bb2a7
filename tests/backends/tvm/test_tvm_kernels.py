"""Each TVM experts kernel (gather, grouped GEMM, dense-masked) against moecc.ops.experts_reference, on
every activation, biases, dropped slots (id -1) and expert choice, with ids and weights from
moecc.routing.route, at several token counts, from ONE compiled module; plus checkers, costs, selection."""
import numpy as np
import pytest
import tvm
from tvm import relax

from moecc.backends.tvm import kernels
from moecc.errors import MoeccError
from numerics import assert_numerically_equal
from tvm_cases import case_inputs, ordered, reference, relax_experts, spec, weights

KERNELS = list(kernels.KERNELS)
ALL_KERNELS = {   # cases every kernel runs
    "gelu": spec("gelu", top_k=2),
    # H=12, F=6: reduction lengths not divisible by the SIMD width
    "swiglu_bias": spec("swiglu_bias", H=12, F=6, act="swiglu", top_k=2, expert_bias=True),
    "dropped": spec("dropped", top_k=2, capacity_factor=0.5),           # id -1 slots, unwritten rows
    "expert_choice": spec("expert_choice", kind="expert_choice", top_k=2),
}
ONE_KERNEL = {    # activations and routers, through one kernel each
    "relu": ("tvm.gather", spec("relu", act="relu", top_k=1)),
    "relu2": ("tvm.grouped_gemm", spec("relu2", act="relu2", top_k=2)),
    "silu": ("tvm.grouped_gemm", spec("silu", act="silu", top_k=3, renormalize=False)),
    "gelu_tanh": ("tvm.dense_masked", spec("gelu_tanh", act="gelu_tanh", top_k=2)),
    "geglu": ("tvm.gather", spec("geglu", act="geglu", top_k=2, kind="topk_softmax")),
    "geglu_tanh": ("tvm.grouped_gemm", spec("geglu_tanh", act="geglu_tanh", top_k=2, interleaved=True)),
    "swiglu_clamp": ("tvm.gather", spec("swiglu_clamp", act="swiglu_clamp", top_k=2, act_limit=0.8)),
    "swiglu_softcap": ("tvm.dense_masked", spec("swiglu_softcap", act="swiglu_softcap", top_k=2, act_limit=0.7, act_alpha=1.5)),
    "swiglu_oai": ("tvm.grouped_gemm", spec("swiglu_oai", act="swiglu_oai", interleaved=True,
                                            kind="topk_softmax", top_k=2, expert_bias=True)),
    "sigmoid": ("tvm.gather", spec("sigmoid", E=8, kind="sigmoid_topk", top_k=2, n_groups=2, scaling=2.0)),
    "hash": ("tvm.grouped_gemm", spec("hash", kind="hash", top_k=2)),
}
ROWS = 2     # the per-row capacity case routes 2 sequences of T/2 tokens
PER_ROW = spec("per_row", top_k=2, capacity_factor=0.5, capacity_per_row=True)


def cases():
    for name, s in ALL_KERNELS.items():
        for k in KERNELS:
            yield f"{name}-{k}", k, s, 1
    for name, (k, s) in ONE_KERNEL.items():
        yield f"{name}-{k}", k, s, 1
    yield "per_row-tvm.grouped_gemm", "tvm.grouped_gemm", PER_ROW, ROWS


CASES = {name: (k, s, rows) for name, k, s, rows in cases()}


@pytest.fixture(scope="module")
def vm():
    bb = relax.BlockBuilder()
    for name, (k, s, rows) in CASES.items():
        relax_experts(bb, name.replace(".", "_").replace("-", "__"), s, weights(s), k)
    return relax.VirtualMachine(tvm.compile(bb.get(), "llvm"), tvm.cpu())


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(vm, name, tokens):
    kernel, s, rows = CASES[name]
    if tokens % rows:
        pytest.skip("per-row capacity: rows of equal length")
    t = case_inputs(s, weights(s), tokens, rows)
    expected = reference(s, t)
    got = vm[name.replace(".", "_").replace("-", "__")](*[tvm.runtime.tensor(a) for a in ordered(t)]).numpy()
    assert np.abs(expected).max() > 0.1, "the case must produce a visible MoE output"
    assert_numerically_equal(got, expected, atol=1e-5, rtol=1e-5, what=name)


def test_zero_tokens_never_read_out_of_bounds(vm):
    """T = 0 (an empty sequence): every kernel returns [0, H] (grouped GEMM's segment sizes were an
    uninitialized sum over 0 rows, and its GEMM read far out of bounds: a segmentation fault)."""
    for name, (kernel, s, _) in CASES.items():
        S = s.num_experts if s.router.kind == "expert_choice" else s.top_k
        t = {"x": np.zeros((0, s.hidden), np.float32), "ids": np.zeros((0, S), np.int64),
             "weights": np.zeros((0, S), np.float32), **{k: v.numpy() for k, v in weights(s).items()}}
        got = vm[name.replace(".", "_").replace("-", "__")](*[tvm.runtime.tensor(a) for a in t.values()])
        assert got.numpy().shape == (0, s.hidden), name


def test_shapes_not_divisible_by_simd_width_still_vectorize_what_they_can():
    from moecc.backends.tvm import tir
    assert [tir.vector_width(k, 8) for k in (16, 12, 6, 7)] == [8, 4, 2, 1]
    assert tir.vector_width(64, 4) == 4 and tir.chains(64, 4) == 4 and tir.chains(12, 4) == 1
    assert tir.row_block(2048, 512) == 32 and tir.row_block(7, 16) == 7


def test_selection_follows_token_count():
    s = spec("mid", E=8, H=512, F=1024, act="swiglu", top_k=2)
    decode, prefill = kernels.select(s, {"tokens": 1}), kernels.select(s, {"tokens": 512})
    assert decode.kernel == "tvm.gather" and prefill.kernel == "tvm.grouped_gemm"
    assert set(prefill.rejected) == set(KERNELS) - {"tvm.grouped_gemm"}
    assert "cost" in prefill.rejected["tvm.dense_masked"] and "T=512" in prefill.reason


def test_costs_grow_with_tokens_and_dense_pays_for_every_expert():
    s = spec("mid", E=8, H=256, F=512, top_k=2)
    for k in kernels.KERNELS.values():
        assert k.cost(s, 1) < k.cost(s, 64) < k.cost(s, 4096)
    assert kernels.cost_dense(s, 512) > kernels.cost_grouped(s, 512)


def test_checkers_give_reasons():
    many = spec("many", E=128, top_k=2)
    assert kernels.check_gather(many, {}) is True
    reason = kernels.check_dense(many, {})
    assert isinstance(reason, str) and "E=128" in reason
    assert "dtype float64" in kernels.check_grouped(many, {"dtype": "float64"})
    choice = kernels.select(many, {"tokens": 4})
    assert choice.kernel != "tvm.dense_masked" and "E=128" in choice.rejected["tvm.dense_masked"]


def test_forced_kernel_must_exist_and_accept_the_layer():
    s = spec("forced", E=128, top_k=2)
    assert kernels.select(s, {"tokens": 512}, "tvm.gather").kernel == "tvm.gather"
    with pytest.raises(MoeccError, match="unknown TVM kernel 'tvm.nope'"):
        kernels.select(s, {"tokens": 1}, "tvm.nope")
    with pytest.raises(MoeccError, match="forced: kernel tvm.dense_masked refuses it: E=128"):
        kernels.select(s, {"tokens": 1}, "tvm.dense_masked")
    with pytest.raises(MoeccError, match="no TVM kernel accepts it"):
        kernels.select(s, {"tokens": 1, "dtype": "float64"})
