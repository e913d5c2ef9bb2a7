"""Issue 15 item 4: random float32 layers through the torch kernels (grouped_gemm's C path when every
expert has ≤ skinny.MAX_M rows, loop, auto), 0..300 tokens (> skinny.MAX_M rows per expert: the torch path), 1 or 2 threads, against experts_reference (the kernels are experts-level since the op family).
The normal run draws N_FAST examples; `make test-slow` (MOECC_SLOW=1) draws N_SLOW."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moecc.backends.torch import select
from moecc.errors import MoeccError
from moecc.ops import experts_reference
from moecc.spec import ACTIVATIONS, GATED, ROUTER_KINDS, MoESpec, RouterSpec
from numerics import assert_numerically_equal

N_FAST, N_SLOW = 40, 400


@st.composite
def float32_cases(draw):
    E = draw(st.integers(2, 10))
    kind = draw(st.sampled_from(sorted(ROUTER_KINDS)))
    groups = draw(st.sampled_from([g for g in (1, 2) if E % g == 0]))
    if kind == "hierarchical":
        assume(groups == 2)
    router = RouterSpec(kind=kind, top_k=draw(st.integers(1, min(E, 4))), renormalize=draw(st.booleans()),
                        scaling=draw(st.sampled_from([1.0, 2.5])),
                        n_groups=groups if kind in ("sigmoid_topk", "hierarchical") else 1,
                        topk_groups=draw(st.integers(1, groups)),
                        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.25])))
    act = draw(st.sampled_from(ACTIVATIONS))
    shared = draw(st.sampled_from([0, 0, 8, 9]))
    spec = MoESpec(E, draw(st.integers(8, 40)), draw(st.integers(8, 24)), act, router,
                   expert_bias=draw(st.booleans()),
                   interleaved=act in GATED and draw(st.booleans()),
                   shared_ffn=shared, shared_gated=shared > 0 and draw(st.booleans()), name="p")
    try:
        spec.validate()
    except MoeccError:
        assume(False)
    return spec, draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13, 21, 33, 40, 150, 300])), draw(st.integers(0, 2 ** 16)), \
        draw(st.sampled_from([1, 2]))


def _check(case):
    spec, T, seed, threads = case
    inputs = select._random_inputs(spec, T, torch.Generator().manual_seed(seed))
    want = experts_reference(*inputs, spec=spec)                  # experts level: routing is ATen ops now
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("torch.grouped_gemm", "torch.loop", select.AUTO):
            got = select.run_experts(name, *inputs, spec=spec)
            assert_numerically_equal(got, want, atol=2e-5, rtol=2e-5, what=f"{name} T={T} threads={threads} {spec}")
    finally:
        torch.set_num_threads(before)


@settings(max_examples=N_FAST, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(float32_cases())
def test_float32_kernels_match_reference(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=N_SLOW, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float32_cases())
def test_float32_kernels_match_reference_campaign(case):
    _check(case)
