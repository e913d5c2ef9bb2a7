"""The cost model's steal term: an exchange issued while the rank computes takes compute time from it
(here the real exchange's threads share the cores with the compute; on a GPU, NCCL's kernels share
the SMs). The model charges each collective's share (per call + per byte of the bottleneck rank's
volume) to the compute that runs after its issue, and a wait that blocks absorbs it (the exchange
then runs while the rank waits); the probe measures it as GEMMs timed beside a burst of exchanges
less the same GEMMs alone."""
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from moecc.distributed.costmodel import Costs, LayerShape, backward_pipeline, pipeline
from moecc.distributed.ep_costs import _volume, measured_costs, sample_ids

# the schedule of test_costmodel_cold (d = 2 without steal: C1 [5, 8), C2 [8, 11), sum1 [11, 11.5),
# sum2 waits for R2 (13): [13.5, 14))
C2 = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=0.0, alpha=0.0, sizes=1.0, plan=1.0, sums=1.0,
           wake=0.5)
STEAL = dict(steal_fixed=0.2, dispatch_steal=0.4, combine_steal=0.6, back_steal=0.8)


def test_steal_is_paid_by_the_compute_after_the_issue_and_absorbed_by_waits():
    """Both dispatches (0.2 + 0.4/2 each) are issued at 2.5; C1 waits for D1 until 5: the wait
    absorbs them, C1 [5, 8). R1 issued at 8 (0.2 + 0.6/2): C2 did not wait, [8, 11.5). R2 issued
    at 11.5, arrives 13.5; sum1 did not wait (R1 at 10): [11.5, 12.5) with R2's 0.5; sum2 waits for
    R2: [14, 14.5)."""
    s = pipeline(replace(C2, **STEAL), 2)
    assert s.compute_intervals[1:] == (pytest.approx((5.0, 8.0)), pytest.approx((8.0, 11.5)),
                                       pytest.approx((11.5, 12.5)), pytest.approx((14.0, 14.5)))
    assert s.step == pytest.approx(14.5) and pipeline(C2, 2).step == pytest.approx(14.0)
    # each collective waited for at once: the exchange runs while the rank waits, nothing stolen
    for cs in (False, True):
        assert pipeline(replace(C2, **STEAL), 1, overlap=False, cold_start=cs).step == \
            pytest.approx(pipeline(C2, 1, overlap=False, cold_start=cs).step)


def test_a_wait_absorbs_only_what_it_lasts():
    """One dispatch stealing 3 at issue (t = 2.5), arrival 6.5 + wake 0.5: the wait (4.5) absorbs
    all of it; stealing 6, 1.5 is left for the experts."""
    c = replace(C2, combine=0.0)
    assert pipeline(replace(c, steal_fixed=3.0), 1).compute_intervals[1] == pytest.approx((7.0, 13.0))
    got = pipeline(replace(c, steal_fixed=6.0), 1).compute_intervals[1]
    assert got == pytest.approx((7.0, 14.5))


def test_shared_expert_blocks_pay_the_dispatches_steal():
    """The shared expert fills the dispatch wait in row blocks: the first block after the
    dispatches' issue runs longer by what they take."""
    c = Costs(dispatch=8.0, combine=2.0, experts=4.0, shared=4.0, alpha=0.0, plan=1.0)
    base, stolen = pipeline(c, 2), pipeline(replace(c, steal_fixed=0.25, dispatch_steal=0.5), 2)
    first = base.compute_intervals[1]
    assert stolen.compute_intervals[1] == pytest.approx((first[0], first[1] + 2 * (0.25 + 0.5 / 2)))
    # + the combines' 0.25 each (no wait before their sums); the step: comm-bound here, alike
    assert stolen.compute == pytest.approx(base.compute + 1.0 + 2 * 0.25) and stolen.step == base.step


def test_backward_pays_steal_where_it_overlaps():
    c = Costs(dispatch=2.0, combine=2.0, experts=4.0, shared=3.0, alpha=0.0, sums=1.0)
    assert backward_pipeline(replace(c, **STEAL), 4, 2).step > backward_pipeline(c, 4, 2).step
    assert backward_pipeline(replace(c, **STEAL), 1).step == pytest.approx(backward_pipeline(c, 1).step)


def test_volume_is_the_bottleneck_ranks_bytes_to_or_from_the_others():
    mat = np.array([[5, 1, 2], [0, 9, 4], [3, 0, 7]])      # own rows (the diagonal) cost nothing
    # sent: 3, 4, 3; received: 3, 1, 6
    assert _volume(mat, 10.0) == 60.0


def test_measured_costs_scale_steal_by_each_direction_volume():
    layer = LayerShape(tokens=64, hidden=16, ffn=32, experts=8, top_k=2, gated=True)
    ids = sample_ids(2, 64, 8, 2, 1.2, seed=3)
    K = {"alpha": 1e-3, "beta": 1e-8, "flops": 5e9, "chunk": 2e-4, "plan": 1e-6, "plan_fixed": 1e-4,
         "sums": 1e-6, "sums_fixed": 1e-4}
    _, old = measured_costs(layer, 2, ids, K)
    assert (old.steal_fixed, old.dispatch_steal, old.combine_steal, old.back_steal) == (0.0, 0.0, 0.0, 0.0)
    _, c = measured_costs(layer, 2, ids, {**K, "steal": 1e-9, "steal_fixed": 3e-4})
    assert c.steal_fixed == 3e-4
    # the ratio of the directions' volumes: combine rows H x 4 bytes, back (H + 1) x 4 per pair
    assert c.back_steal / c.combine_steal == pytest.approx(17 / 16)
    assert c.dispatch_steal > c.combine_steal > 0          # rows once per destination + 24 B a pair
    ids_t = np.asarray(ids)
    assert c.combine_steal == pytest.approx(1e-9 * 16 * 4 * _pairs_volume(ids_t, 8))


def _pairs_volume(ids, experts):
    """(token, slot) pairs crossing between the 2 ranks, the larger direction (contiguous experts)."""
    dest = ids // (experts // 2)                                   # [W, T, k] rank of each choice
    sent = [(dest[r] != r).sum() for r in range(2)]                # rank r receives the other's
    return max(sent)


def test_probe_measures_steal(one_rank_group, monkeypatch):
    """On one rank nothing crosses (per byte 0); an exchange whose issue keeps the caller busy 20 ms
    steals about 20 ms per call (the probe: GEMMs beside a burst of exchanges less the GEMMs alone;
    their span cut to 5 ms, so a loaded machine's noise stays small beside the planted cost)."""
    from moecc.distributed import comm
    from moecc.distributed.probe import measure_steal

    monkeypatch.setattr("moecc.distributed.probe.STEAL_SPAN_S", 5e-3)
    w_in = torch.randn(2, 64, 32)
    per_byte, base = measure_steal(None, 32, w_in, 64, repeats=3)
    assert per_byte == 0.0 and math.isfinite(base) and base >= 0
    real = comm.all_to_all

    def slow(*args, **kw):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 20e-3:
            pass
        return real(*args, **kw)
    monkeypatch.setattr(comm, "all_to_all", slow)
    per_byte, fixed = measure_steal(None, 32, w_in, 64, repeats=3)
    assert per_byte == 0.0 and 15e-3 < fixed - base < 30e-3, (base, fixed)
