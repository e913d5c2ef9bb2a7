"""Every torch kernel == moe_reference: random E, k, H, F, T, every router (capacity drops, expert
choice, hash, groups), biases, gated/interleaved activations, shared experts; through the op too."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numerics import assert_numerically_equal

from moecc.backends.torch import kernels, select
from moecc.errors import MoeccError
from moecc.ops import call_moe, moe_reference, record_routing
from moecc.spec import ACTIVATIONS, GATED, ROUTER_KINDS, MoESpec, RouterSpec

NAMES = list(kernels.KERNELS)


def make_inputs(spec: MoESpec, T: int, seed: int = 0, dtype=torch.float64, rows: int = 0) -> list:
    """The op's tensor arguments; rows > 0 shapes x as [rows, T/rows, H] (logits, token ids alike)."""
    g = torch.Generator().manual_seed(seed)
    E, H, R, Fw = spec.num_experts, spec.hidden, spec.in_rows, spec.ffn
    L = E + (spec.router.n_groups if spec.router.kind == "hierarchical" else 0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)   # noqa: E731
    sh_rows = spec.shared_in_rows
    x, logits = rnd(T, H), rnd(T, L)
    ids = torch.randint(0, 1000, (T,), generator=g) if spec.router.kind == "hash" else None
    if rows:
        x, logits = x.view(rows, T // rows, H), logits.view(rows, T // rows, L)
        ids = None if ids is None else ids.view(rows, T // rows)
    return [x, logits, rnd(E, R, H), rnd(E, H, Fw),
            rnd(E, R) if spec.expert_bias else None, rnd(E, H) if spec.expert_bias else None,
            rnd(E) if spec.router.kind == "sigmoid_topk" else None,
            rnd(sh_rows, H) if spec.shared_ffn else None, rnd(H, spec.shared_ffn) if spec.shared_ffn else None,
            rnd(1, H) if spec.shared_ffn and spec.shared_gated else None, ids]


@st.composite
def cases(draw):
    E = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(sorted(ROUTER_KINDS)))
    activation = draw(st.sampled_from(ACTIVATIONS))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if E % g == 0]))
    if kind == "hierarchical":
        groups = max(groups, 2) if E % 2 == 0 else 1
        assume(groups > 1)
    topk_groups = draw(st.integers(1, groups))
    k = draw(st.integers(1, E))
    capacity = draw(st.sampled_from([None, None, 0.5, 1.0, 2.0]))
    slots = draw(st.sampled_from([0, 0, 1, 2])) if kind != "expert_choice" else 0
    router = RouterSpec(kind=kind, top_k=k, renormalize=draw(st.booleans()),
                        scaling=draw(st.sampled_from([1.0, 2.5])), n_groups=groups if kind in
                        ("sigmoid_topk", "hierarchical") else 1, topk_groups=topk_groups,
                        capacity_factor=capacity, capacity=slots, capacity_per_row=draw(st.booleans()),
                        fp32=draw(st.booleans()))
    shared = draw(st.sampled_from([0, 0, 3]))
    spec = MoESpec(E, draw(st.integers(2, 12)), draw(st.integers(1, 8)), activation, router,
                   expert_bias=draw(st.booleans()), interleaved=activation in GATED
                   and draw(st.booleans()), shared_ffn=shared, shared_gated=shared > 0 and draw(st.booleans()),
                   name="prop")
    try:
        spec.validate()
    except MoeccError:
        assume(False)
    rows = draw(st.sampled_from([1, 1, 2, 3]))                 # x [rows, S, H] (per-row capacity)
    return spec, rows * draw(st.sampled_from([1, 1, 2, 3, 5, 8])), draw(st.integers(0, 2 ** 16)), rows


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_kernel_matches_reference(case):
    spec, T, seed, rows = case
    inputs = make_inputs(spec, T, seed, rows=rows)
    expected = moe_reference(*inputs, spec)
    for name in NAMES:
        got = select.run(name, *inputs, spec=spec)
        assert got.shape == expected.shape
        assert_numerically_equal(got, expected, atol=1e-9, rtol=1e-9, what=f"{name} on {spec}")


@pytest.mark.parametrize("name", NAMES + [select.AUTO])
def test_through_the_op_forward_and_backward(name):
    """call_moe with a torch kernel: same output; backward recomputes the reference's gradients."""
    spec = MoESpec(4, 6, 5, "swiglu", RouterSpec(top_k=2), expert_bias=True, shared_ffn=3, name="l0")
    inputs = make_inputs(spec, 7, seed=3)
    x, logits, w_in, w_out, b_in, b_out, _, sw_in, sw_out, _, _ = inputs
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, w_in, w_out)]
    kw = dict(b_in=b_in, b_out=b_out, shared_w_in=sw_in, shared_w_out=sw_out)
    y = call_moe(*leaves, spec, kernel=name, **kw)
    y_ref = call_moe(*[t.detach().requires_grad_(True) for t in leaves], spec, kernel="reference", **kw)
    assert_numerically_equal(y, y_ref, atol=1e-10, rtol=1e-10, what=name)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y_direct = moe_reference(*ref_leaves, b_in, b_out, None, sw_in, sw_out, None, None, spec)
    ref_grads = torch.autograd.grad(y_direct.square().sum(), ref_leaves)
    for g, r in zip(grads, ref_grads):
        assert_numerically_equal(g, r, atol=1e-9, rtol=1e-9, what=f"{name} grad")


@pytest.mark.parametrize("name", NAMES + [select.AUTO])
def test_no_tokens(name):
    """An empty batch (T = 0, e.g. a dropped micro-batch) gives an empty output, not an error."""
    spec = MoESpec(4, 6, 5, "gelu", RouterSpec(top_k=2), shared_ffn=2)
    for shape in ((0, 6), (2, 0, 6)):
        inputs = make_inputs(spec, 0)
        inputs[0], inputs[1] = inputs[0].reshape(shape), inputs[1].reshape(*shape[:-1], 4)
        assert select.run(name, *inputs, spec=spec).shape == shape


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_routing_records(name):
    """float32 within 1e-5; every kernel reports its routing to record_routing() like the reference."""
    spec = MoESpec(8, 16, 12, "swiglu", RouterSpec(top_k=2, capacity_factor=0.5), name="layer3")
    inputs = make_inputs(spec, 9, seed=5, dtype=torch.float32)
    with record_routing() as records:
        got = select.run(name, *inputs, spec=spec)
        expected = moe_reference(*inputs, spec)
    assert_numerically_equal(got, expected, atol=1e-5, rtol=1e-5, what=name)
    assert [r["layer"] for r in records] == ["layer3", "layer3"]
    assert torch.equal(records[0]["expert_ids"], records[1]["expert_ids"])
    assert (records[0]["expert_ids"] == -1).any()          # capacity 0.5 drops some assignments


@pytest.mark.parametrize("tokens", [1, 3, 6, 40])
def test_float32_gemm_variants(tokens):
    """gemm.linear's forms (w·aᵀ for m ≤ 4, m = 3 padded, oneDNN for ≥ 4096 weight rows incl. m = 1, MKL)."""
    spec = MoESpec(2, 8, 2048, "swiglu", RouterSpec(top_k=1), expert_bias=True)   # w_in [2, 4096, 8]
    inputs = make_inputs(spec, tokens, seed=tokens, dtype=torch.float32)
    inputs[2] = inputs[2] * 0.3
    for name in NAMES:
        got = select.run(name, *inputs, spec=spec)
        assert_numerically_equal(got, moe_reference(*inputs, spec), atol=1e-3, rtol=1e-4, what=name)


def test_grouped_gemm_gathers_per_expert_when_rows_do_not_fit(monkeypatch):
    """Large T: rows gathered per expert segment instead of one [N, H] buffer; same numbers."""
    spec = MoESpec(4, 6, 5, "geglu", RouterSpec(top_k=2, capacity_factor=0.75), expert_bias=True, shared_ffn=2)
    inputs = make_inputs(spec, 11, seed=2)
    monkeypatch.setattr(kernels, "GATHER_ONCE_BYTES", 0)
    assert_numerically_equal(select.run("torch.grouped_gemm", *inputs, spec=spec), moe_reference(*inputs, spec),
                             atol=1e-10, rtol=1e-10)


def test_unknown_kernel_is_a_clear_error():
    spec = MoESpec(4, 6, 5, name="blocks.2.moe")
    with pytest.raises(MoeccError, match="blocks.2.moe.*unknown torch kernel 'torch.fast'"):
        select.run("torch.fast", *make_inputs(spec, 2), spec=spec)


def test_checkers_refuse_with_reasons():
    big_e = MoESpec(64, 8, 4, router=RouterSpec(top_k=6))
    assert "E=64 > 8" in kernels.KERNELS["torch.dense_masked"].checker(big_e, 4)
    assert "decode kernel" in kernels.KERNELS["torch.gather"].checker(big_e, 512)
    assert kernels.KERNELS["torch.gather"].checker(big_e, 1) is True
    assert kernels.KERNELS["torch.grouped_gemm"].checker(big_e, 10 ** 6) is True


def test_expected_load():
    spec = MoESpec(8, 8, 8, router=RouterSpec(top_k=2))
    hit, m = kernels.expected_load(spec, 1)
    assert hit == pytest.approx(2.0) and m == pytest.approx(1.0)
    hit, m = kernels.expected_load(spec, 4096)
    assert hit == pytest.approx(8.0) and m == pytest.approx(1024.0)
    ec = MoESpec(8, 8, 8, router=RouterSpec("expert_choice", capacity_factor=2.0))
    assert kernels.expected_load(ec, 64) == (8.0, 16.0)


@pytest.fixture
def two_threads():
    """Two intra-op threads: loop, grouped_gemm and gather split whole experts over threads (parallel.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["torch.loop", "torch.grouped_gemm", "torch.gather"])
def test_experts_split_over_threads_match_reference(two_threads, name):
    """Partial sums per thread (added at the end) match the reference; grad leaves and inference
    mode both work (grad/inference mode are thread-local); the thread count is restored."""
    for seed, spec in enumerate([MoESpec(8, 6, 5, "swiglu", RouterSpec(top_k=3), expert_bias=True, shared_ffn=3,
                                         shared_gated=True),
                                 MoESpec(4, 6, 5, "gelu", RouterSpec(top_k=2, capacity_factor=0.5))]):
        inputs = make_inputs(spec, 5, seed=seed)
        expected = moe_reference(*inputs, spec)
        assert_numerically_equal(select.run(name, *inputs, spec=spec), expected, atol=1e-10, rtol=1e-10, what=name)
        with torch.inference_mode():
            got = select.run(name, *inputs, spec=spec)
        assert_numerically_equal(got, expected, atol=1e-10, rtol=1e-10, what=f"{name} inference mode")
        leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]
        y = call_moe(*leaves, spec, kernel=name, b_in=inputs[4], b_out=inputs[5], shared_w_in=inputs[7],
                     shared_w_out=inputs[8], shared_gate=inputs[9])
        assert_numerically_equal(y, expected, atol=1e-10, rtol=1e-10, what=f"{name} through the op")
        assert torch.get_num_threads() == 2


def test_balance_groups_by_cost():
    from moecc.backends.torch.parallel import balance, run_groups
    groups = balance([5.0, 1.0, 4.0, 2.0, 3.0], 2)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert sorted(sum([5.0, 1.0, 4.0, 2.0, 3.0][i] for i in g) for g in groups) == [7.0, 8.0]
    assert balance([1.0], 4) == [[0]]
    assert run_groups(lambda g: (sum(g), torch.get_num_threads()), [[1, 2], [3]]) == [(3, 1), (3, 1)]


def test_skinny_gemm_matches_blas():
    """skinny.py's weight-streaming kernel: tails in K (not a multiple of 8) and N (not of 3 or 6),
    every m up to MAX_M, rows of a strided; what it refuses goes to BLAS."""
    from moecc.backends.torch import gemm, skinny
    if not skinny.available():
        pytest.skip("no C compiler or no AVX2/FMA here: gemm.linear uses BLAS only")
    g = torch.Generator().manual_seed(0)
    for m in range(1, skinny.MAX_M + 1):
        for n, k in ((1, 8), (7, 13), (20, 64), (5, 1003)):
            a = torch.randn(m, 2 * k, generator=g)[:, k:]                  # row stride 2k
            w = torch.randn(n, k, generator=g)
            assert skinny.fits(a, w)
            assert_numerically_equal(skinny.gemm(a, w), a @ w.t(), atol=1e-4, rtol=1e-4, what=f"m={m} {n}x{k}")
    a, w = torch.randn(4, 16), torch.randn(6, 16)
    assert not skinny.fits(a.double(), w.double())                          # float32 only
    assert not skinny.fits(torch.randn(skinny.MAX_M + 1, 16), w)            # many rows: MKL
    assert not skinny.fits(a, torch.randn(16, 6).t())                       # w must be contiguous
    assert gemm.form(a, w) == "skinny"
    assert_numerically_equal(gemm.linear(a, w, torch.ones(6)), a @ w.t() + 1, atol=1e-5, rtol=1e-5)
    torch.set_num_threads(2)
    try:
        assert gemm.form(a, w) != "skinny"                                  # one thread only
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_gemm_batched_skinny_path(monkeypatch, threads):
    """float32, every expert ≤ skinny.MAX_M rows: grouped_gemm's routed experts in ONE skinny.moe C call
    per thread; every activation (gated, interleaved, plain), biases, drops, shared experts (ungated:
    skinny.ffn_all; gated: torch), more tokens than MAX_M with few rows per expert."""
    from moecc.backends.torch import skinny
    if not skinny.available():
        pytest.skip("no C compiler or no AVX2/FMA here")
    calls = []
    real, real_parts = skinny.moe, skinny.moe_parts
    monkeypatch.setattr(skinny, "moe", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(skinny, "moe_parts", lambda *a: calls.extend(zip(a[-1], a[-1][1:])) or real_parts(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (spec, T) in enumerate([
                (MoESpec(8, 24, 16, "swiglu", RouterSpec(top_k=2), expert_bias=True, shared_ffn=8), 11),
                (MoESpec(6, 16, 9, "geglu", RouterSpec(top_k=3, capacity_factor=0.75), interleaved=True), 11),
                (MoESpec(5, 40, 13, "gelu", RouterSpec(top_k=1), expert_bias=True), 11),
                (MoESpec(4, 16, 8, "relu", RouterSpec(top_k=1), shared_ffn=8, shared_gated=True), 1),
                (MoESpec(4, 16, 8, "gelu_tanh", RouterSpec(top_k=2)), 3),
                (MoESpec(4, 16, 8, "silu", RouterSpec(top_k=2), shared_ffn=9), 5),
                (MoESpec(3, 16, 8, "swiglu_oai", RouterSpec(top_k=2), interleaved=True, expert_bias=True), 7),
                (MoESpec(32, 16, 8, "swiglu", RouterSpec(top_k=2)), 40)]):
            inputs = make_inputs(spec, T, seed=seed, dtype=torch.float32)
            calls.clear()
            got, expected = select.run("torch.grouped_gemm", *inputs, spec=spec), moe_reference(*inputs, spec)
            # float32 sums in another order (16 or 8 lanes): a few ulp of the output's scale (up to ~200 here)
            scale = expected.abs().max().item()
            assert_numerically_equal(got, expected, atol=1e-5 + 4e-7 * scale, rtol=1e-5, what=str(spec))
            assert 1 <= len(calls) <= threads                # one run of experts per thread (one C call)
            assert sorted(e for lo, hi in calls for e in range(lo, hi)) == sorted(
                set(e for lo, hi in calls for e in range(lo, hi)))   # disjoint runs
    finally:
        torch.set_num_threads(before)


@st.composite
def experts_cases(draw):
    """Experts-level inputs: ids anywhere in [-1, E') (empty slots, repeats across tokens), E' may be
    a rank's local experts (fewer than the spec's), any weights."""
    E = draw(st.integers(1, 8))
    activation = draw(st.sampled_from(ACTIVATIONS))
    spec = MoESpec(max(E, 2), draw(st.integers(2, 12)), draw(st.integers(1, 8)), activation,
                   RouterSpec(top_k=1), expert_bias=draw(st.booleans()),
                   interleaved=activation in GATED and draw(st.booleans()))
    return spec, E, draw(st.integers(0, 9)), draw(st.integers(1, 4)), draw(st.integers(0, 2 ** 16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(experts_cases())
def test_every_experts_kernel_matches_experts_reference(case):
    from moecc.ops import experts_reference
    spec, E, T, S, seed = case
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    xt, weights = rnd(T, spec.hidden), rnd(T, S)
    ids = torch.randint(-1, E, (T, S), generator=g)
    w_in, w_out = rnd(E, spec.in_rows, spec.hidden), rnd(E, spec.hidden, spec.ffn)
    b_in, b_out = (rnd(E, spec.in_rows), rnd(E, spec.hidden)) if spec.expert_bias else (None, None)
    expected = experts_reference(xt, ids, weights, w_in, w_out, b_in, b_out, spec)
    for name in NAMES + [select.AUTO]:
        if name in kernels.KERNELS and kernels.KERNELS[name].checker(spec, T) is not True:
            continue
        got = select.run_experts(name, xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec)
        assert_numerically_equal(got, expected, atol=1e-9, rtol=1e-9, what=f"{name} on {spec}, E'={E}")
        via_op = torch.ops.moecc.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec.to_json(), name)
        assert_numerically_equal(via_op, expected, atol=1e-9, rtol=1e-9, what=f"{name} through the op")


@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu", "geglu", "relu", "relu2", "gelu_tanh"])
def test_skinny_activation_follows_torch(activation):
    """The C kernel's activation (vectorized exp / erf for gelu, silu and their gated forms; scalar for
    the rest) on values from -90 to 90 (exp's clamps, erf's tails), 0 and ±1e-30, against the float64
    activation: error ≤ 3e-7 of the input's scale (|x|, gated |x|²: torch's own float32 activation is
    1-2e-7 there; near-cancelling tails such as gelu(-7.7) are all rounding for both), and no worse than
    twice torch's; NaN stays NaN. Identity weights make the FFN its activation alone: y = act(x)
    (gated: act(x) * x)."""
    from moecc.backends.torch import skinny
    from moecc.ops import activate
    if not skinny.available():
        pytest.skip("no C compiler or no AVX2/FMA here")
    H = 40                                                   # 2.5 vectors of 16 lanes: vector + scalar tail
    x = torch.cat([torch.linspace(-90, 90, 28 * H - 3), torch.tensor([0.0, 1e-30, -1e-30]),
                   torch.randn(H, generator=torch.Generator().manual_seed(0))]).reshape(29, H)   # ≤ MAX_M rows
    eye = torch.eye(H)
    gated = activation in GATED
    spec = MoESpec(2, H, H, activation, RouterSpec(top_k=1), shared_ffn=H).validate()
    w_in = torch.cat([eye, eye]).contiguous() if gated else eye
    got = skinny.ffn_all(torch.zeros_like(x), x, w_in, eye, spec)
    truth = activate(x.double() @ w_in.double().t(), spec)
    scale = x.double().abs() ** (2 if gated else 1) + 1e-30
    err = ((got.double() - truth).abs() / scale).max().item()
    err_torch = ((activate(x @ w_in.t(), spec).double() - truth).abs() / scale).max().item()
    assert err <= max(3e-7, 2 * err_torch), (activation, err, err_torch)
    x[3, 5] = x[20, 39] = float("nan")
    y = skinny.ffn_all(torch.zeros_like(x), x, w_in, eye, spec)
    assert torch.isnan(y[3, 5]) and torch.isnan(y[20, 39]) and torch.isfinite(y[4]).all()   # (NaN · 0 in the row)
