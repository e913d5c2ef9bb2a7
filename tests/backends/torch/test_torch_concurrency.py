"""Issue 15 items 5-8: two callers at once. The process's thread count survives concurrent kernels,
the expert pool is never shut down under a caller and a failing worker's siblings are awaited,
record_routing is context-local, autotuned tables of two artifacts with the same shapes do not
overwrite each other, and bf16 with 2 threads keeps the reference's summation order."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from moecc.backends.torch import parallel, select
from moecc.ops import call_moe, moe_reference, record_routing
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal


def _layer(E=8, H=32, F=48, k=2, dtype=torch.float32, seed=0, name="l"):
    g = torch.Generator().manual_seed(seed)
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="gelu", router=RouterSpec("softmax_topk", k),
                   name=name).validate()
    w = [torch.randn(E, F, H, generator=g).to(dtype) * H ** -0.5, torch.randn(E, H, F, generator=g).to(dtype) * F ** -0.5]
    return spec, w


def _args(spec, w, T=64, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, spec.hidden, generator=g).to(dtype)
    logits = torch.randn(T, spec.num_experts, generator=g).to(dtype)
    return x, logits, w[0], w[1], None, None, None, None, None, None, None


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _concurrently(fn, n=2):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as e:       # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _fresh_thread_count() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start(), t.join()
    return seen[0]


def test_concurrent_callers_leave_the_thread_count_alone(two_threads):
    def matmul(group):
        a = torch.randn(64, 64)
        return float((a @ a).sum())

    def caller(i):
        for _ in range(300):
            parallel.run_groups(matmul, [[0], [1]])
    for _ in range(3):                                      # the old race showed in ~4 of 5 rounds
        _concurrently(caller, 4)
        assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2


def test_concurrent_kernels_stay_exact(two_threads):
    spec, w = _layer()
    args = _args(spec, w)
    want = moe_reference(*args, spec=spec)

    def caller(i):
        for _ in range(50):
            assert_numerically_equal(select.run("torch.loop", *args, spec=spec), want, atol=1e-5, rtol=1e-5)
    _concurrently(caller, 2)


def test_pool_is_not_shut_down_under_another_caller():
    mine = parallel._executor(1)                            # a caller holds the pool ...
    parallel._executor(parallel._pool_workers + 2)         # ... another needs a bigger one
    assert mine.submit(lambda: 7).result() == 7


def test_a_failing_group_waits_for_its_siblings():
    done = []

    def fn(group):
        if group == [0]:
            raise ValueError("expert 0 failed")
        time.sleep(0.3)
        done.append(group)
    with pytest.raises(ValueError, match="expert 0 failed"):
        parallel.run_groups(fn, [[0], [1], [2]])
    assert sorted(done) == [[1], [2]]                   # no future left running behind the error


def test_record_routing_is_context_local():
    spec_a, w_a = _layer(name="a")
    spec_b, w_b = _layer(name="b", seed=3)
    barrier = threading.Barrier(2)
    seen = {}

    def caller(i):
        spec, w = (spec_a, w_a) if i == 0 else (spec_b, w_b)
        x, logits, *rest = _args(spec, w)
        with record_routing() as records:
            barrier.wait()
            for _ in range(20):
                call_moe(x, logits, rest[0], rest[1], spec=spec)
            barrier.wait()
        seen[i] = {r["layer"] for r in records}, len(records)
    _concurrently(caller)
    assert seen == {0: ({"a"}, 20), 1: ({"b"}, 20)}


def test_two_artifacts_with_the_same_shapes_keep_their_own_tables():
    spec, w = _layer(E=4, name="")
    fast_loop = {"spec": spec.to_dict(), "buckets": [{"bucket": b, "times_ms": {"torch.loop": 1.0,
                 "torch.grouped_gemm": 9.0}} for b in range(5)]}
    fast_dense = {"spec": spec.to_dict(), "buckets": [{"bucket": b, "times_ms": {"torch.loop": 9.0,
                  "torch.dense_masked": 1.0, "torch.grouped_gemm": 9.0}} for b in range(5)]}
    try:
        kernel_a = select.install_layer(fast_loop)
        kernel_b = select.install_layer(fast_dense)
        assert kernel_a != kernel_b and kernel_a.startswith(select.AUTO)
        assert select.dispatch(spec, 64, kernel_a) == "torch.loop"
        assert select.dispatch(spec, 64, kernel_b) == "torch.dense_masked"
    finally:
        select.uninstall()


def test_bf16_with_two_threads_keeps_the_reference_order(two_threads):
    spec, w = _layer(E=8, H=64, F=64, k=4, dtype=torch.bfloat16)
    args = _args(spec, w, T=64, dtype=torch.bfloat16)
    want = moe_reference(*args, spec=spec)
    for name in ("torch.loop", "torch.grouped_gemm"):
        got = select.run(name, *args, spec=spec)
        assert torch.equal(got, want), f"{name}: {(got != want).sum()} of {got.numel()} differ"


def test_where_experts_split_over_threads(two_threads, monkeypatch):
    """With 2 intra-op threads: grouped_gemm's family never hands work to parallel.py's Python workers
    (they competed with torch's spinning OpenMP pool: a 2-thread op as slow as 1 thread); its C path
    splits runs of experts on OpenMP threads in one call (skinny.moe_parts), its BLAS path runs experts
    in turn with every GEMM on both threads. torch.loop still uses the workers, inside a section whose
    own ops run at one thread; the process's count is 2 again after each. All equal the reference."""
    from moecc.backends.torch import kernels, skinny
    spec, w = _layer(E=8, H=32, F=48)
    seen, real = [], parallel.run_groups
    monkeypatch.setattr(kernels, "run_groups",
                        lambda fn, groups: seen.append(torch.get_num_threads()) or real(fn, groups))
    parts, real_parts = [], skinny.moe_parts
    monkeypatch.setattr(skinny, "moe_parts", lambda *a: parts.append(a[-1]) or real_parts(*a))
    for kernel, T in (("torch.grouped_gemm", 64), ("torch.grouped_gemm", 2048), ("torch.dnn_gemm", 2048),
                      ("torch.loop", 64)):
        seen.clear(), parts.clear()
        args = _args(spec, w, T=T)
        got = call_moe(*args[:4], spec, kernel=kernel)
        assert_numerically_equal(got, moe_reference(*args, spec), atol=1e-5, rtol=1e-5, what=f"{kernel} T={T}")
        assert torch.get_num_threads() == 2
        if kernel == "torch.loop":
            assert seen == [1], seen                       # inside the op's section: its thread at 1
        else:
            assert seen == [], (kernel, T, seen)
            assert (len(parts) == 1) == (T == 64 and skinny.available()), (kernel, T, parts)
