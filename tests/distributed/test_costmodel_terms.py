"""The cost model's terms measured at start-up beyond α, β and the GEMMs: the wake-up of a wait that
blocks (a lone exchange's latency beyond a burst's), reading a received dispatch, the split sizes'
bytes per chunk; the probe's constants as the model uses them (ep_costs.measured_costs); and the
probe timing the work the layer really does (its received-dispatch reader against a real dispatch)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from moecc.distributed.costmodel import Costs, LayerShape, pipeline
from moecc.distributed.ep_costs import measured_costs, runtime_costs, sample_ids

K = {"alpha": 1e-3, "beta": 1e-8, "flops": 5e9, "chunk": 2e-4, "plan": 1e-6, "plan_fixed": 1e-4,
     "sums": 1e-6, "sums_fixed": 1e-4}


def test_wake_is_paid_by_each_wait_that_blocks():
    """Serial: plan 1, sizes 1 (+ wake .5), D 4 (+ .5), experts 6, R 4 (+ .5), shared + sum 2: 19.5.
    d=2 (shared 0): plan 1, sizes [1, 2) + .5 -> 2.5; D1 [2.5, 4.5), D2 [4.5, 6.5); C1 waits for D1:
    [5, 8); C2: D2 arrived at 6.5 < 8, no wait: [8, 11); R1 [8, 10), R2 [11, 13); sum1 after R1
    (arrived before C2 ended: no wait) [11, 11.5); sum2 waits for R2: [13.5, 14): step 14."""
    c = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=1.5, alpha=0.0, sizes=1.0, plan=1.0,
              sums=0.5, wake=0.5)
    assert pipeline(c, 1, overlap=False).step == pytest.approx(1 + 1.5 + 4.5 + 6 + 4.5 + 2)
    c2 = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=0.0, alpha=0.0, sizes=1.0, plan=1.0,
               sums=1.0, sums_fixed=0.0, wake=0.5)
    s = pipeline(c2, 2)
    assert s.step == pytest.approx(14.0)
    assert s.compute_intervals[1:] == (pytest.approx((5.0, 8.0)), pytest.approx((8.0, 11.0)),
                                       pytest.approx((11.0, 11.5)), pytest.approx((13.5, 14.0)))
    no_wake = pipeline(replace(c2, wake=0.0), 2)
    assert no_wake.step == pytest.approx(14.0 - 1.5)                    # sizes, D1 and R2 waits


def test_unpack_per_chunk_and_split_sizes_bytes_per_chunk():
    """Reading a received dispatch is part of each chunk's experts step: fixed + per token / d; the
    split-size vector grows by 2W counts per chunk."""
    c = Costs(dispatch=0.0, combine=0.0, experts=4.0, shared=0.0, alpha=0.0, unpack=2.0, unpack_fixed=0.5,
              sizes=1.0, sizes_chunk=0.25)
    # d=4: sizes 1 + 3 * .25 = 1.75; 4 chunks of experts 1 + unpack .5 + .5 = 2 each
    assert pipeline(c, 4).step == pytest.approx(1.75 + 4 * 2.0)
    assert pipeline(c, 1).step == pytest.approx(1.0 + 4.0 + 2.5)


def test_runtime_costs_count_the_split_sizes_per_chunk():
    """sizes: (W-1)(5 + 2W) int64 at β; each further chunk adds (W-1) 2W int64."""
    layer = LayerShape(tokens=32, hidden=16, ffn=32, experts=8, top_k=2)
    ids = sample_ids(4, 32, 8, 2, 0.0)
    cl, c = measured_costs(layer, 4, ids, K)
    assert c.sizes == pytest.approx(K["alpha"] + 3 * (5 + 8) * 8 * K["beta"])
    assert c.sizes_chunk == pytest.approx(3 * 8 * 8 * K["beta"])


def test_measured_costs_take_the_probe_fields():
    """Old constants (without lone / unpack) give the costs they always gave; lone - alpha is the
    wake-up, unpack scales with the tokens."""
    layer = LayerShape(tokens=64, hidden=16, ffn=32, experts=8, top_k=2, gated=True)
    ids = sample_ids(2, 64, 8, 2, 0.0)
    cl, old = measured_costs(layer, 2, ids, K)
    ref = runtime_costs(layer, cl, ids, plan=K["plan"] * 64, plan_fixed=K["plan_fixed"], sums=K["sums"] * 64,
                        sums_fixed=K["sums_fixed"])
    assert old == ref and old.wake == 0.0 and old.unpack == 0.0 and old.floor == 0.0
    _, new = measured_costs(layer, 2, ids, {**K, "lone": 3e-3, "unpack": 1e-6, "unpack_fixed": 5e-5})
    assert new.wake == pytest.approx(2e-3)
    assert new.unpack == pytest.approx(64e-6) and new.unpack_fixed == 5e-5
    _, fast = measured_costs(layer, 2, ids, {**K, "lone": 0.5e-3})         # lone < alpha: no wake
    assert fast.wake == 0.0
    # the backward: experts at the measured backward throughput (forward FLOPs per s), its fixed
    # cost per call, token sums per token; without them the model's defaults (0 = derived)
    assert old.experts_backward == 0.0 and old.backward_fixed == 0.0 and old.grads == 0.0
    _, bw = measured_costs(layer, 2, ids, {**K, "bwd_flops": K["flops"] / 2.5, "bwd_chunk": 4e-4,
                                           "grads": 2e-6, "grads_fixed": 1e-5})
    assert bw.experts_backward == pytest.approx(2.5 * bw.experts)
    assert (bw.backward_fixed, bw.grads, bw.grads_fixed) == (4e-4, pytest.approx(128e-6), 1e-5)
    assert bw.back > bw.combine > bw.weights_back > bw.alpha     # rows of H + 1, H and 1 elements


def test_probe_measures_the_backward(one_rank_group):
    """The probe times the local experts' backward and the gradients' token sums on the ranks
    (measure_compute: [..., 1 / bwd_flops, bwd_chunk, grads, grads_fixed])."""
    from moecc.distributed.layout import LayerPlacement
    from moecc.distributed.probe import measure_compute
    from moecc.spec import MoESpec, RouterSpec

    H, F = 128, 256
    spec = MoESpec(num_experts=4, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=2))
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(4, 2 * F, H, generator=g), torch.randn(4, H, F, generator=g)
    with torch.no_grad():                     # as schedule.configure calls it
        t = measure_compute(spec, w_in, w_out, LayerPlacement.contiguous("m", 4, 1), None, 256, repeats=2)
    inv_flops, inv_bwd, bwd_chunk, grads, grads_fixed = t[0], *t[10:14]
    assert len(t) == 22 and 0 < grads < 1, t
    assert 0 <= bwd_chunk < 1 and 0 <= grads_fixed < 1
    flop = 2.0 * H * (2 * F + F)              # forward FLOPs per row: a slope, not the clip (1e-15 / flop)
    assert inv_bwd > 1e-12 / flop and inv_bwd > inv_flops / 10, (inv_bwd, inv_flops)



def test_probe_reads_a_dispatch_as_the_layer_receives_it(one_rank_group):
    """The probe times Dispatched.wait() on a buffer laid out as received without a collective
    (probe._reader); on one rank a real dispatch receives exactly its own buffer, so the two must
    give the same rows, weights and local ids, bit for bit."""
    from moecc.distributed.ep import dispatch, exchange_sizes
    from moecc.distributed.layout import LayerPlacement, layout
    from moecc.distributed.probe import _reader

    g = torch.Generator().manual_seed(0)
    T, H, E, k = 12, 8, 4, 2
    placement = LayerPlacement.contiguous("m", E, 1)
    ids = torch.topk(torch.rand(T, E, generator=g), k, 1).indices
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    lay = layout(ids, placement, 0, np.arange(T))
    sizes = exchange_sizes(lay, placement, None, 0, H, x.dtype)
    real = dispatch(x, w, ids, lay, sizes, None).wait()
    probed = _reader(x, w, ids, lay, None)()
    assert torch.equal(probed.x, real.x) and torch.equal(probed.weights, real.weights)
    assert torch.equal(probed.ids, real.ids)


def test_floor_is_the_least_time_a_collective_holds_the_channel():
    """floor 2 (the real exchange's pace while the cores compute) above the modelled .5 per chunk:
    D1 [0, 2), D2 [2, 4), R1 [4, 6), R2 [6, 8) -> step 8 (2 without the floor)."""
    c = Costs(dispatch=1.0, combine=1.0, experts=0.0, shared=0.0, alpha=0.0, floor=2.0)
    s = pipeline(c, 2)
    assert s.step == pytest.approx(8.0) and s.comm == pytest.approx(8.0)
    assert pipeline(replace(c, floor=0.0), 2).step == pytest.approx(2.0)
    layer = LayerShape(tokens=64, hidden=16, ffn=32, experts=8, top_k=2, gated=True)
    _, m = measured_costs(layer, 2, sample_ids(2, 64, 8, 2, 0.0), {**K, "busy": 4e-3})
    assert m.floor == 4e-3


def test_costs_count_a_planned_placement_as_the_runtime_dispatches_it():
    """With a placement (replicas splitting an expert's tokens), the model's traffic is what
    layout.layout sends rank by rank: pairs and hidden rows per (source, destination), received pairs
    per rank; a contiguous LayerPlacement counts the same as no placement."""
    from moecc.distributed.ep_costs import _matrices
    from moecc.distributed.layout import LayerPlacement, layout
    W, T, E, k = 4, 64, 8, 2
    ids = sample_ids(W, T, E, k, 1.2, seed=5, permute=True)
    contiguous = LayerPlacement.contiguous("moe", E, W)
    for a, b in zip(_matrices(ids, E), _matrices(ids, E, contiguous)):
        np.testing.assert_array_equal(a, b)
    share = np.zeros((E, W))
    share[np.arange(E), [0, 0, 1, 1, 2, 2, 3, 3]] = 1.0
    share[5] = [0.0, 0.5, 0.5, 0.0]                 # expert 5: half its tokens on rank 1, half on 2
    share[0] = [0.25, 0.25, 0.25, 0.25]             # expert 0 on every rank
    placed = LayerPlacement("moe", share, np.zeros(E, bool), 1)
    pairs, rows, received = _matrices(ids, E, placed)
    for r in range(W):
        lay = layout(torch.as_tensor(ids[r]), placed, r, np.arange(r * T, (r + 1) * T))
        assert pairs[r].tolist() == list(lay.send) and rows[r].tolist() == list(lay.row_send)
    assert received.tolist() == pairs.sum(0).tolist()
    assert not np.array_equal(pairs, _matrices(ids, E)[0])     # the plan moves traffic


def test_packing_runs_while_the_split_sizes_are_in_flight():
    """Chunked: layout (plan - pack), then the split sizes in flight while the dispatch buffers are
    packed; the dispatches go when both are done (a wait, with its wake-up, only if the sizes arrive
    after the packing). plan 1 (pack .5 of it), sizes 1, wake .5, D 4, experts 6, R 4: layout
    [0, .5), sizes [.5, 1.5), pack [.5, 1), D1 [2, 6), experts [6.5, 12.5), R [12.5, 16.5), step 17
    (packing after the sizes: 17.5). A pack longer than the sizes hides them whole. Serial: unchanged."""
    c = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=0.0, alpha=0.0, sizes=1.0, plan=1.0,
              pack=0.5, wake=0.5)
    s = pipeline(c, 1)
    assert s.step == pytest.approx(17.0) and pipeline(replace(c, pack=0.0), 1).step == pytest.approx(17.5)
    assert s.compute_intervals[:2] == (pytest.approx((0.0, 0.5)), pytest.approx((0.5, 1.0)))
    assert s.comm_intervals[:2] == (pytest.approx((0.5, 1.5)), pytest.approx((2.0, 6.0)))
    long = replace(c, plan=3.0, pack=2.0)                   # layout [0, 1), sizes [1, 2), pack [1, 3)
    assert pipeline(long, 1).comm_intervals[1] == pytest.approx((3.0, 7.0))
    assert pipeline(c, 1, overlap=False).step == pipeline(replace(c, pack=0.0), 1, overlap=False).step
