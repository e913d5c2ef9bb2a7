"""torch.packed_gemm and packed.py: MKL-packed expert weights give F.linear's bits, are packed once per
weight tensor, repacked after an in-place update, and never used where they cannot be kept honest."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_numerically_equal

from moecc.backends.torch import gemm, kernels, packed, select
from moecc.ops import experts_reference
from moecc.routing import route
from moecc.spec import MoESpec, RouterSpec

pytestmark = pytest.mark.skipif(not packed.available(), reason="torch built without MKL")

SPEC = MoESpec(4, 32, 48, "swiglu", RouterSpec(top_k=2), expert_bias=True)     # w_in [4, 96, 32]


def _inputs(T: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)                              # noqa: E731
    x, logits = rnd(T, 32), rnd(T, 4)
    weights, ids = route(logits, SPEC)
    return [x, ids, weights, rnd(4, 96, 32) * 0.2, rnd(4, 32, 48) * 0.2, rnd(4, 96), rnd(4, 32)]


def _counting(monkeypatch, reorder: str):
    """The shapes packed.py's `reorder` function is called with, the pack cache empty before and after."""
    calls = []
    real = getattr(packed, reorder)
    monkeypatch.setattr(packed, reorder, lambda w: calls.append(tuple(w.shape)) or real(w))
    packed.clear()
    yield calls
    packed.clear()


@pytest.fixture
def counted(monkeypatch):
    yield from _counting(monkeypatch, "_reorder")


@pytest.mark.parametrize("m", [5, 40, 100, 300])
def test_packed_linear_gives_f_linear_bits(m, counted):
    w = torch.randn(3, 70, 33)
    a, b = torch.randn(m, 33), torch.randn(70)
    blas = gemm.form(a, w[0]) == "mkl"                    # else skinny.py / w·aᵀ: gemm.linear itself
    for e in range(3):                                    # views of one stacked tensor: a pack per view
        assert torch.equal(packed.linear(a, w[e], b), F.linear(a, w[e], b) if blas else gemm.linear(a, w[e], b))
    assert len(counted) == (3 if blas else 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_gemm_matches_reference_and_packs_once(threads, counted):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _inputs(300)                            # ~150 rows per expert: the BLAS path
        expected = experts_reference(*inputs, spec=SPEC)
        for _ in range(2):
            got = select.run_experts("torch.packed_gemm", *inputs, spec=SPEC)
            assert_numerically_equal(got, expected, atol=1e-4, rtol=1e-4, what="packed_gemm")
            assert torch.equal(got, kernels.grouped_gemm(*inputs, spec=SPEC))   # same GEMM bits
        assert sorted(counted) == sorted([(96, 32)] * 4 + [(32, 48)] * 4)        # once per expert weight
    finally:
        torch.set_num_threads(before)


def test_in_place_update_repacks(counted):
    inputs = _inputs(300, seed=1)
    kernels.packed_gemm(*inputs, spec=SPEC)
    with torch.no_grad():
        inputs[3].mul_(-0.5)                            # w_in updated in place: the packs are stale
    got = kernels.packed_gemm(*inputs, spec=SPEC)
    assert_numerically_equal(got, experts_reference(*inputs, spec=SPEC), atol=1e-4, rtol=1e-4, what="after update")
    assert len(counted) == 8 + 4


def test_not_packed_where_it_cannot_be_kept_honest(counted):
    w = torch.randn(64, 40)
    assert packed.pack(w.double()) is None                                  # MKL's packed sgemm: float32
    with torch.inference_mode():
        wi = torch.randn(64, 40)
    assert packed.pack(wi) is None                                          # no version counter
    assert packed.pack(w.requires_grad_()) is None                          # training: grad mode on
    with torch.no_grad():
        assert packed.pack(w) is not None
    assert counted == [(64, 40)]


def test_packs_are_dropped_with_their_weights(counted):
    w = torch.randn(2, 64, 40)
    packed.pack(w[0])
    assert len(packed._PACKS) == 1
    del w
    assert len(packed._PACKS) == 0


def test_cost_model_scales_only_the_blas_path(monkeypatch):
    spec = MoESpec(8, 1024, 3584, "swiglu", RouterSpec(top_k=2))
    cost, grouped = kernels.KERNELS["torch.packed_gemm"].cost, kernels.KERNELS["torch.grouped_gemm"].cost
    assert cost(spec, 2048) == grouped(spec, 2048)                      # measured: no gain (PACKED_GAIN 1.0)
    monkeypatch.setattr(kernels, "PACKED_GAIN", 0.8)
    assert cost(spec, 1) == grouped(spec, 1)                            # skinny.py's rows: nothing packed
    assert cost(spec, 2048) < grouped(spec, 2048)


@pytest.fixture
def counted_dnn(monkeypatch):
    yield from _counting(monkeypatch, "_reorder_dnn")


@pytest.mark.skipif(not packed.available("dnn"), reason="torch built without oneDNN")
@pytest.mark.parametrize("threads", [1, 2])
def test_dnn_gemm_matches_reference_reorders_once_and_again_after_an_update(threads, counted_dnn):
    """torch.dnn_gemm: oneDNN's reordered weights (another summation order than F.linear: close, not
    bit-equal), reordered once per expert weight, again after an in-place update."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _inputs(300, seed=2)                    # ~150 rows per expert: the BLAS path
        for _ in range(2):
            got = select.run_experts("torch.dnn_gemm", *inputs, spec=SPEC)
            assert_numerically_equal(got, experts_reference(*inputs, spec=SPEC), atol=1e-4, rtol=1e-4,
                                     what="dnn_gemm")
        assert sorted(counted_dnn) == sorted([(96, 32)] * 4 + [(32, 48)] * 4)
        with torch.no_grad():
            inputs[4].mul_(-0.5)                        # w_out updated in place: its reorders are stale
        got = kernels.dnn_gemm(*inputs, spec=SPEC)
        assert_numerically_equal(got, experts_reference(*inputs, spec=SPEC), atol=1e-4, rtol=1e-4,
                                 what="dnn_gemm after update")
        assert len(counted_dnn) == 8 + 4
    finally:
        torch.set_num_threads(before)


def test_dnn_cost_follows_the_measured_gain(monkeypatch):
    spec = MoESpec(8, 1024, 3584, "swiglu", RouterSpec(top_k=2))
    dnn, grouped = kernels.KERNELS["torch.dnn_gemm"].cost, kernels.KERNELS["torch.grouped_gemm"].cost
    consts = dict(kernels.machine.constants())
    monkeypatch.setattr(kernels.machine, "constants", lambda: {**consts, "dnn_gain": 2.0})
    assert dnn(spec, 2048) < 0.75 * grouped(spec, 2048)
    monkeypatch.setattr(kernels.machine, "constants", lambda: {**consts, "dnn_gain": 0.5})
    assert dnn(spec, 2048) > grouped(spec, 2048)


@pytest.mark.skipif(not packed.available("dnn"), reason="torch built without oneDNN")
def test_dnn_linear_takes_rows_skinny_would_from_its_work_on(counted_dnn):
    """At 1 thread gemm.linear runs ≤ skinny.MAX_M rows in skinny.py; dnn_linear gives oneDNN the ones
    with m ≥ DNN_MIN_M and m·N·K ≥ DNN_OVER_SKINNY (oneDNN is faster there on this kind of CPU), and
    the activation fused as its post-op (dnn_linear_act) where it runs; the numbers agree with F.linear."""
    from moecc.backends.torch import skinny
    from moecc.ops import activate
    if not skinny.available():
        pytest.skip("no C compiler or no AVX2/FMA here: gemm.linear has no skinny form to take rows from")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, b = torch.randn(192, 384), torch.randn(192)
        edge = packed.DNN_OVER_SKINNY // w.numel() + 1                          # first m oneDNN takes
        for m, to_dnn in ((2, False), (edge - 1, False), (edge, True), (24, True)):
            a = torch.randn(m, 384)
            counted_dnn.clear()
            packed.clear()
            assert_numerically_equal(packed.dnn_linear(a, w, b), F.linear(a, w, b), atol=1e-4, rtol=1e-5)
            assert bool(counted_dnn) == to_dnn, (m, counted_dnn)
            assert gemm.form(a, w) == "skinny"                                  # what gemm.linear would do
            fused = packed.dnn_linear_act(a, w, b, "gelu")
            assert (fused is not None) == to_dnn
            if fused is not None:
                spec = MoESpec(2, 384, 192, "gelu", RouterSpec(top_k=1))
                assert_numerically_equal(fused, activate(F.linear(a, w, b), spec), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
