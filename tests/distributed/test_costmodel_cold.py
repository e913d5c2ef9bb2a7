"""The cost model's cold penalty: a compute step right after a wait that blocked runs slower than the
same call in a burst (caches and clocks after an idle wait). The model charges each such step its
part's penalty (Costs.cold_*), no step that did not wait, and the step's first layout when it starts
from idle; the probe measures the penalty as one call after an exchange waited for at once."""
import math
from dataclasses import replace

import pytest
import torch

from moecc.distributed.costmodel import Costs, LayerShape, pipeline
from moecc.distributed.ep_costs import COLD, measured_costs, sample_ids
from moecc.distributed.probe import _cold, _penalty

# the schedule of test_costmodel_terms.test_wake_is_paid_by_each_wait_that_blocks
C2 = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=0.0, alpha=0.0, sizes=1.0, plan=1.0, sums=1.0,
           wake=0.5)
COLD_C = dict(cold_exp=0.4, cold_exp_fixed=0.1, cold_sums=0.2, cold_sums_fixed=0.1, cold_pack=0.3,
              cold_pack_fixed=0.05, cold_plan=0.6, cold_plan_fixed=0.2)


def test_cold_penalty_is_paid_by_the_step_after_each_wait_that_blocks():
    """d=2 (without cold: C1 [5, 8), C2 [8, 11), sum1 [11, 11.5), sum2 waits for R2: [13.5, 14)).
    C1 waited for D1: +0.1 + 0.4/2 -> [5, 8.3); C2 did not wait (D2 at 6.5): [8.3, 11.3); R1 [8.3,
    10.3), R2 [11.3, 13.3); sum1 did not wait: [11.3, 11.8); sum2 waited: [13.8, 14.5)."""
    c = replace(C2, **COLD_C)
    s = pipeline(c, 2)
    assert s.compute_intervals[1:] == (pytest.approx((5.0, 8.3)), pytest.approx((8.3, 11.3)),
                                       pytest.approx((11.3, 11.8)), pytest.approx((13.8, 14.5)))
    assert s.step == pytest.approx(14.5)
    # serial: every compute step follows a wait: plan 1, sizes 1 + .5, packing .35, D 4 + .5, experts
    # 6 + .5, R 4 + .5, shared + sum 1 + .3
    assert pipeline(c, 1, overlap=False).step == pytest.approx(1 + 1.5 + 0.35 + 4.5 + 6.5 + 4.5 + 1.3)
    assert pipeline(C2, 1, overlap=False).step == pytest.approx(1 + 1.5 + 4.5 + 6 + 4.5 + 1)
    # from idle, the first layout pays the plan's penalty (per call + its tokens' share)
    assert pipeline(c, 2, cold_start=True).step == pytest.approx(14.5 + 0.2 + 0.6 / 2)
    assert pipeline(c, 1, overlap=False, cold_start=True).step == pytest.approx(19.65 + 0.8)


def test_no_penalty_without_a_wait_that_blocks():
    """Exchanges that always arrive before the compute needs them: the cold penalties cost nothing."""
    c = Costs(dispatch=0.0, combine=0.0, experts=6.0, shared=2.0, alpha=0.0, plan=1.0, sums=1.0)
    for d in (1, 2, 4):
        assert pipeline(replace(c, **COLD_C), d).step == pytest.approx(pipeline(c, d).step)


def test_measured_costs_scale_the_cold_penalties_by_the_tokens():
    layer = LayerShape(tokens=64, hidden=16, ffn=32, experts=8, top_k=2, gated=True)
    ids = sample_ids(2, 64, 8, 2, 0.0)
    K = {"alpha": 1e-3, "beta": 1e-8, "flops": 5e9, "chunk": 2e-4, "plan": 1e-6, "plan_fixed": 1e-4,
         "sums": 1e-6, "sums_fixed": 1e-4}
    _, old = measured_costs(layer, 2, ids, K)
    assert all(getattr(old, f) == 0.0 for f in COLD)                      # old constants: none
    _, c = measured_costs(layer, 2, ids, {**K, **{f: 1e-6 if not f.endswith("_fixed") else 3e-5 for f in COLD}})
    for f in COLD:
        assert getattr(c, f) == pytest.approx(3e-5 if f.endswith("_fixed") else 64e-6), f


def test_penalty_line_from_two_sizes():
    assert _penalty(10, 1.0, 20, 3.0) == (pytest.approx(0.2), 0.0)       # through the two, clipped at 0
    assert _penalty(10, 2.0, 20, 1.0) == (0.0, 1.0)                       # shrinking: the larger size's
    assert _penalty(10, -1.0, 20, -2.0) == (0.0, 0.0)                     # faster than the burst: none
    assert _penalty(10, 1.0, 20, 1.5) == (pytest.approx(0.05), pytest.approx(0.5))


def test_cold_times_the_call_after_a_real_wait_not_the_wait(one_rank_group):
    """Each timed call follows an exchange waited for at once (here through a delayed transport,
    α = 20 ms): every call's exchange runs, and the time is the call's, not the wait's."""
    from moecc.distributed.comm import use_transport
    from moecc.distributed.transport import DelayedTransport

    tr = DelayedTransport(alpha=20e-3, beta=0.0)
    prev = use_transport(tr)
    try:
        x = torch.randn(64, 64)
        t = _cold([lambda: x @ x, lambda: x @ x @ x], None, repeats=3)
    finally:
        use_transport(prev)
        tr.close()
    assert tr.calls == 3 * 2 * 3              # per timed call: the start's 2 agreeing calls + its exchange
    assert all(math.isfinite(v) and 0 < v < 5e-3 for v in t), t


def test_probe_measures_cold_penalties(one_rank_group, monkeypatch):
    """measure_compute's last 8 values: the cold penalties, per token and per call, finite and >= 0;
    with every cold call taking 1 s, each part's penalty is about 1 s (its fixed part)."""
    from moecc.distributed.layout import LayerPlacement
    from moecc.distributed.probe import measure_compute
    from moecc.spec import MoESpec, RouterSpec

    H, F = 64, 128
    spec = MoESpec(num_experts=4, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=2))
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(4, 2 * F, H, generator=g), torch.randn(4, H, F, generator=g)
    with torch.no_grad():
        t = measure_compute(spec, w_in, w_out, LayerPlacement.contiguous("m", 4, 1), None, 128, repeats=2)
    cold = t[14:]
    assert len(cold) == len(COLD) == 8 and all(math.isfinite(v) and v >= 0 for v in cold), cold
    monkeypatch.setattr("moecc.distributed.probe._cold", lambda fns, group, repeats: [1.0] * len(fns))
    slow = measure_compute(spec, w_in, w_out, LayerPlacement.contiguous("m", 4, 1), None, 128, repeats=1)[14:]
    assert all(0.9 < v < 1.0 for v in slow[1::2]) and all(v < 1e-3 for v in slow[0::2]), slow
    untimed = measure_compute(spec, w_in, w_out, LayerPlacement.contiguous("m", 4, 1), None, 128, repeats=1,
                              aligned=False)
    assert untimed[14:] == [0.0] * 8                                       # the old probe: not measured
