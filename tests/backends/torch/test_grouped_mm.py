"""torch.grouped_mm (grouped_mm.py): experts sorted by expert through two torch._grouped_mm ops equal
experts_reference for every router and activation, sum a token's slots in the reference's order, weigh
unless every weight is 1, and hand what torch._grouped_mm cannot take to grouped_gemm (saying why)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from numerics import assert_numerically_equal
from test_torch_kernels import cases, make_inputs

from moecc.backends.torch import grouped_mm as gmm
from moecc.backends.torch import kernels, select
from moecc.ops import experts_reference, moe_reference
from moecc.spec import MoESpec, RouterSpec

pytestmark = pytest.mark.skipif(not gmm.available(), reason="this torch has no torch._grouped_mm")
MOEFIED = MoESpec(8, 384, 192, "gelu", RouterSpec("topk_unit", 2, renormalize=False), expert_bias=True)


def _never(*_a, **_k):
    raise AssertionError("grouped_mm fell back to grouped_gemm")


@pytest.fixture
def no_fallback(monkeypatch):
    """The grouped_mm path itself: its fallback (kernels.grouped_gemm) must not run."""
    monkeypatch.setattr(kernels, "grouped_gemm", _never)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(cases())
def test_matches_the_reference_for_every_router_and_activation(no_fallback, case):
    """Every router (capacity drops, expert choice, hash, groups), biases in or after the GEMM, gated
    and interleaved activations, shared experts; float32, H and F rounded up to multiples of 4."""
    spec, T, seed, rows = case
    spec = spec.replace(hidden=4 * math.ceil(spec.hidden / 4), ffn=4 * math.ceil(spec.ffn / 4))
    inputs = make_inputs(spec, T, seed, dtype=torch.float32, rows=rows)
    got = select.run("torch.grouped_mm", *inputs, spec=spec)
    assert_numerically_equal(got, moe_reference(*inputs, spec), atol=1e-4, rtol=1e-4, what=str(spec))


def test_empty_slots_and_an_expert_twice_in_a_token(no_fallback):
    g = torch.Generator().manual_seed(1)
    spec = MoESpec(5, 8, 4, "swiglu", RouterSpec(top_k=1), expert_bias=True)
    xt, weights = torch.randn(9, 8, generator=g), torch.randn(9, 3, generator=g)
    ids = torch.tensor([[0, 0, -1], [4, -1, 4], [-1, -1, -1], [2, 1, 3], [3, 3, 3],
                        [1, -1, 0], [4, 2, 0], [0, 1, 2], [-1, 2, -1]])
    w = (torch.randn(5, 8, 8, generator=g), torch.randn(5, 8, 4, generator=g),
         torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g))
    got = kernels.grouped_mm(xt, ids, weights, *w, spec=spec)
    assert_numerically_equal(got, experts_reference(xt, ids, weights, *w, spec), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros(8))
    none = kernels.grouped_mm(xt, torch.full((9, 3), -1), weights, *w, spec=spec)
    assert torch.equal(none, torch.zeros(9, 8))


def test_slots_are_summed_in_ascending_expert_order(no_fallback):
    """Experts 0, 1, 2 output 2^60, -2^60 and 1 (exact float32 GEMMs): in the reference's order
    ((2^60 - 2^60) + 1) a token gets 1; any other order loses the 1. The slots listed in every order."""
    spec = MoESpec(3, 4, 4, "relu", RouterSpec(top_k=3))
    w_in, w_out = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    w_in[:, 0, 0] = 1.0
    w_out[:, 0, 0] = torch.tensor([2.0 ** 60, -2.0 ** 60, 1.0])
    ids = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1], [0, 2, 1], [1, 0, 2]])   # [6, 3]
    xt, weights = torch.zeros(6, 4), torch.ones(6, 3)
    xt[:, 0] = 1.0
    expected = experts_reference(xt, ids, weights, w_in, w_out, None, None, spec)
    assert torch.equal(expected[:, 0], torch.ones(6))
    assert torch.equal(kernels.grouped_mm(xt, ids, weights, w_in, w_out, None, None, spec=spec), expected)


@pytest.mark.parametrize("router", [RouterSpec("topk_unit", 2, renormalize=False),
                                    RouterSpec(top_k=2), RouterSpec(top_k=2, capacity_factor=0.75)])
@pytest.mark.parametrize("T", [64, 300])
def test_moefied_minilm_shape(no_fallback, router, T):
    """The shape of issue 17 (E=8 of 192 neurons, H=384, GELU, biases), through the op: unit weights
    (nothing to weigh), softmax weights, capacity drops."""
    spec = MOEFIED.replace(router=router)
    inputs = make_inputs(spec, T, seed=T, dtype=torch.float32)
    inputs[2], inputs[3] = inputs[2] / 20, inputs[3] / 14
    got = select.run("torch.grouped_mm", *inputs, spec=spec)
    assert_numerically_equal(got, moe_reference(*inputs, spec), atol=1e-5, rtol=1e-5, what=str(router))


def test_layout_of_the_pairs():
    ids = torch.tensor([[1, 0], [1, -1], [0, 1], [2, 1]])                 # loads 2, 4, 1; one empty slot
    weights = torch.tensor([[0.5, 0.25], [2.0, 9.0], [3.0, 4.0], [5.0, 6.0]])
    kept, offs, pos, w, dropped = gmm.layout(ids, weights, 3)
    assert kept.tolist() == [1, 4, 0, 2, 5, 7, 6] and offs.tolist() == [2, 6, 7] and offs.dtype == torch.int32
    assert pos.tolist() == [[0, 2], [3, 7], [1, 4], [5, 6]]               # ascending per token; empty → N = 7
    assert w.tolist() == [0.25, 3.0, 0.5, 2.0, 4.0, 6.0, 5.0] and dropped == 1
    assert gmm.layout(ids, torch.ones(4, 2), 3)[3] is None                 # every weight 1: nothing to weigh
    assert gmm.layout(torch.full((2, 2), -1), weights[:2], 3) is None


def test_what_grouped_mm_cannot_take_runs_grouped_gemm(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(kernels, "grouped_gemm", lambda *a, **k: calls.append(a[0].dtype) or torch.zeros_like(a[0]))
    spec = MoESpec(4, 8, 4, "gelu", RouterSpec(top_k=2))
    g = torch.Generator().manual_seed(0)
    xt, ids = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6, 2), generator=g)
    w_in, w_out = torch.randn(4, 4, 8, generator=g), torch.randn(4, 8, 4, generator=g)
    with caplog.at_level(logging.DEBUG, logger="moecc.backends.torch.grouped_mm"):
        for dt in (torch.float64, torch.bfloat16):
            kernels.grouped_mm(xt.to(dt), ids, torch.ones(6, 2, dtype=dt), w_in.to(dt), w_out.to(dt), None, None, spec=spec)
        kernels.grouped_mm(xt, ids, torch.ones(6, 2), w_in.transpose(1, 2).contiguous().transpose(1, 2), w_out,
                           None, None, spec=spec)                         # non-contiguous weights
    assert calls == [torch.float64, torch.bfloat16, torch.float32]
    assert caplog.text.count("grouped_gemm instead") == 3
    odd = MoESpec(4, 6, 5, "gelu", RouterSpec(top_k=2))
    assert "H=6, R=5, F=5 not a multiple of 4" in kernels.KERNELS["torch.grouped_mm"].checker(odd, 8)
    assert "R=10, F=5 not" in gmm.check(MoESpec(4, 8, 5, "swiglu", RouterSpec(top_k=2)), None)
    xo = torch.randn(6, 6, generator=g)
    kernels.grouped_mm(xo, ids, torch.ones(6, 2), torch.randn(4, 5, 6), torch.randn(4, 6, 5), None, None, spec=odd)
    assert calls[-1] == torch.float32 and len(calls) == 4


def test_selection_picks_it_between_the_skinny_path_and_large_t(tmp_path, monkeypatch):
    """With the constants of test_torch_select's 2-core machine (skinny.py available): the MoEfied MiniLM
    layer runs grouped_gemm's one C call up to T=64 (T=128 with the 16-lane kernel), grouped_mm at 128-512 (no per-expert ops), grouped_gemm
    again at 2048 (its intermediates stay in cache); an odd shape is refused with the reason."""
    from test_torch_select import CONSTS

    from moecc.backends.torch import machine
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    machine.use({**CONSTS, "skinny": True})
    try:
        from moecc.backends.torch import skinny
        picks = {t: select.choose(MOEFIED, t) for t in (64, 128, 512, 2048)}
        wide = skinny.LANES == 16       # 16-lane C kernel: its one call up to 96 rows per expert (T=128: ~32)
        assert {t: c.kernel for t, c in picks.items()} == {
            64: "torch.grouped_gemm", 128: "torch.grouped_gemm" if wide else "torch.grouped_mm",
            512: "torch.grouped_mm", 2048: "torch.grouped_gemm"}
        assert picks[512].reason.startswith("cost model") and "cost model" in picks[512].rejected["torch.grouped_gemm"]
        odd = select.choose(MoESpec(8, 6, 5, "gelu", RouterSpec(top_k=2)), 512)
        assert "needs rows of 16 bytes" in odd.rejected["torch.grouped_mm"]
    finally:
        machine.use(None)
