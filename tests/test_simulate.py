"""`moecc simulate` and the expert-parallel cost model: checked against DeepEP's published low-latency
table (model check, no timing), the schedule recurrence by hand, the CLI's table and its refusals."""
from dataclasses import replace

import numpy as np
import pytest

from moecc.cli import main
from moecc.distributed.costmodel import (Cluster, Costs, LayerShape, Link, backward_pipeline, choose_degree,
                                         choose_degrees, intersection, layer_costs, pipeline, trace_probs,
                                         zipf_probs)
from moecc.errors import MoeccError
from moecc.simulate import DEEPEP_TABLES, calibrate_deepep, deepep_check


@pytest.mark.parametrize("table", ["2025-06", "2025-04"])
def test_deepep_predictions_within_6_percent(table):
    """Calibrated on EP16 and EP256 only; EP32/64/128 are predictions, each within ±6% of the README."""
    rows = {r["ep"]: r for r in deepep_check(table)}
    assert set(rows) == {16, 32, 64, 128, 256}
    for ep in (32, 64, 128):
        r = rows[ep]
        assert not r["calibrated"]
        assert abs(r["dispatch_err"]) <= 0.06, (ep, r)
        assert abs(r["combine_err"]) <= 0.06, (ep, r)
    published = DEEPEP_TABLES[table]
    assert rows[256]["dispatch_pred_us"] == pytest.approx(published[256][0], rel=1e-9)


def test_deepep_calibration_is_physical():
    """The fitted network link of the 2025-06 table: tens of us latency, 35..50 GB/s (CX7 ≈ 50 GB/s)."""
    links = calibrate_deepep(DEEPEP_TABLES["2025-06"])
    for link in links.values():
        assert 0 < link.latency < 100e-6
        assert 35e9 < link.bandwidth < 50e9


def _cluster(**kw):
    base = dict(nodes=1, devices=4, intra=Link(1e-3, 1e9), inter=Link(1e-3, 1e9), flops=1e10)
    return Cluster(**{**base, **kw})


def test_pipeline_by_hand():
    """d=2: D1 [0,2) D2 [2,4); the shared expert's 4 blocks [0,1) while D1 flies; C1 [2,5);
    R1 [5,7); C2 [5,8); R2 [8,10): step 10."""
    c = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=1.0, alpha=0.0)
    s = pipeline(c, 2)
    assert s.step == pytest.approx(10.0)
    assert s.comm == pytest.approx(8.0)
    # hidden: D2 under C1 -> 2; R1 under C2 -> 2; D1 under the shared expert -> 1; R2 -> 0
    assert s.exposed_comm == pytest.approx(3.0)
    serial = pipeline(c, 1, overlap=False)
    assert serial.step == pytest.approx(4 + 1 + 6 + 4) and serial.overlap == 0.0
    assert pipeline(c, 1).step == pytest.approx(4 + 6 + 4)          # d=1: shared hides in the dispatch


def test_backward_pipeline_by_hand():
    """The pipelined backward (expert backward 2 x experts = 6, gradients back = combine = 4):
    d=2, b=2: CB1 [0,2) CB2 [2,4); group 0's experts [2,5), its gradients back [5,7); group 1's
    [5,8), back [8,10): step 10. d=2, b=1 (both chunks in one exchange per direction): CB [0,4),
    experts [4,10), back [10,14). Unchunked (autograd): combine backward, experts, hidden rows,
    weights (one latency, here 0) in a row: 14. The shared expert's backward (2 x shared) runs first."""
    c = Costs(dispatch=4.0, combine=4.0, experts=3.0, shared=0.0, alpha=0.0)
    s = backward_pipeline(c, 2)
    assert s.degree == 2 and s.step == pytest.approx(10.0)
    assert s.compute_intervals == (pytest.approx((2.0, 5.0)), pytest.approx((5.0, 8.0)),
                                   pytest.approx((8.0, 8.0)), pytest.approx((10.0, 10.0)))
    assert s.comm_intervals[2:] == (pytest.approx((5.0, 7.0)), pytest.approx((8.0, 10.0)))
    assert backward_pipeline(c, 2, 1).step == pytest.approx(14.0)
    assert backward_pipeline(c, 1).step == pytest.approx(14.0) == backward_pipeline(c, 2, overlap=False).step
    # per-chunk fixed costs per forward chunk, the shared expert's backward (2 x 1) whole and first
    # (shared_blocks=1, the graph's): d=4, b=2, fixed .25: [0,2); CB1 [2,4) CB2 [4,6); group 0:
    # 2 x .25 + 3 = 3.5 [4,7.5); back [7.5,9.5); group 1 [7.5,11), back [11,13)
    c2 = replace(c, shared=1.0, backward_fixed=0.25)
    assert backward_pipeline(c2, 4, 2, shared_blocks=1).step == pytest.approx(13.0)
    # in 8 blocks of .25 filling the first wait (the runtime's filler): CB1 [0,2) CB2 [2,4); the
    # blocks [0,2); group 0 [2,5.5), back [5.5,7.5); group 1 [5.5,9), back [9,11)
    s2 = backward_pipeline(c2, 4, 2)
    assert s2.step == pytest.approx(11.0)
    assert s2.compute_intervals[:8] == tuple(pytest.approx((i / 4, (i + 1) / 4)) for i in range(8))
    with pytest.raises(MoeccError, match="divide"):
        backward_pipeline(c, 4, 3)


def test_choose_degrees_merges_chunks_when_latency_dominates_the_backward():
    """alpha 0.9 of an exchange of 1: at d=2 the backward in one group (CB [0,1), experts [1,2), back
    [2,3): 3) beats two groups (per exchange .95: 3.8); with alpha 0 two groups win."""
    c = Costs(dispatch=1.0, combine=1.0, experts=0.5, shared=0.0, alpha=0.9)
    assert backward_pipeline(c, 2, 1).step == pytest.approx(3.0)
    assert backward_pipeline(c, 2, 2).step == pytest.approx(3.8)
    f, b = choose_degrees(c, degree=2)
    assert (f.degree, b.degree) == (2, 1)
    f, b = choose_degrees(replace(c, alpha=0.0), degree=2)
    assert (f.degree, b.degree) == (2, 2)
    f, b = choose_degrees(replace(c, alpha=0.0))            # free: forward + backward fastest
    options = {(d, bd): pipeline(replace(c, alpha=0.0), d).step + backward_pipeline(replace(c, alpha=0.0), d, bd).step
               for d in range(1, 9) for bd in range(1, d + 1) if d % bd == 0}
    assert f.step + b.step <= min(options.values()) * 1.05 + 1e-12 and f.degree % b.degree == 0


def test_pipeline_fills_waits_greedily_with_shared_blocks():
    """The runtime's rule (moecc.distributed.overlap): a shared-expert block (shared / 2d) runs
    whenever the awaited collective has not arrived. shared = 3 at d = 2: blocks of .75 at 0, .75,
    1.5 (the last overruns D1's end at 2 by .25) -> C1 [2.25, 5.25), R1 [5.25, 7.25), C2 [5.25,
    8.25), R2 [8.25, 10.25); the fourth block [8.25, 9) fills R2's wait: step 10.25, exposed 1.25."""
    c = Costs(dispatch=4.0, combine=4.0, experts=6.0, shared=3.0, alpha=0.0)
    s = pipeline(c, 2)
    assert s.step == pytest.approx(10.25)
    assert s.exposed_comm == pytest.approx(1.25)
    blocks = [iv for iv in s.compute_intervals if iv[1] - iv[0] == pytest.approx(0.75)]
    assert blocks == [pytest.approx((0.0, 0.75)), pytest.approx((0.75, 1.5)), pytest.approx((1.5, 2.25)),
                      pytest.approx((8.25, 9.0))]
    serial = pipeline(c, 1, overlap=False)                         # nothing hides without overlap
    assert serial.step == pytest.approx(4 + 6 + 4 + 3) and serial.exposed_comm == pytest.approx(8.0)
    # the graph path (shared expert whole between the EP layer's two nodes): [0, 3) -> C1 [3, 6),
    # R1 [6, 8), C2 [6, 9), R2 [9, 11)
    whole = pipeline(c, 2, shared_blocks=1)
    assert whole.step == pytest.approx(11.0) and whole.compute_intervals[1] == pytest.approx((0.0, 3.0))


def test_choose_degree_is_argmin_and_alpha_limits_it():
    c = Costs(dispatch=4.0, combine=4.0, experts=8.0, shared=1.0, alpha=0.0)
    best = choose_degree(c, tolerance=0.0)
    assert best.step == min(pipeline(c, d).step for d in range(1, 9))
    assert best.degree == 8                    # no per-chunk cost: more chunks never hurt
    costly = choose_degree(c, chunk_overhead=1.0, tolerance=0.0)
    assert costly.degree < 8
    assert costly.step == min(pipeline(c, d, 1.0).step for d in range(1, 9))


def test_choose_degree_takes_the_smallest_degree_within_the_tolerance():
    c = Costs(dispatch=4.0, combine=4.0, experts=8.0, shared=1.0, alpha=0.0)
    steps = {d: pipeline(c, d).step for d in range(1, 9)}
    for tol in (0.0, 0.05, 0.2, 10.0):
        want = min(d for d, s in steps.items() if s <= min(steps.values()) * (1 + tol))
        assert choose_degree(c, tolerance=tol).degree == want
    assert choose_degree(c, tolerance=10.0).degree == 1      # everything within: the fewest chunks
    assert choose_degree(c).degree < 8                       # the default tolerance is not 0


def test_skew_moves_rows_to_the_hot_rank():
    layer = LayerShape(tokens=64, hidden=32, ffn=64, experts=8, top_k=2)
    flat = layer_costs(layer, _cluster())
    hot = layer_costs(layer, _cluster(), zipf_probs(8, 1.5))
    assert hot.experts > 1.5 * flat.experts
    assert hot.dispatch > flat.dispatch


def test_intersection_of_unions():
    assert intersection([(0, 2), (1, 3), (5, 6)], [(2.5, 5.5)]) == pytest.approx(1.0)
    assert intersection([(0, 1)], [(1, 2)]) == 0.0


def test_trace_probs_ignore_dropped():
    p = trace_probs(np.array([[0, 1], [1, -1]]), 4)
    np.testing.assert_allclose(p, [1 / 3, 2 / 3, 0, 0])


def test_cli_table_and_degree(capsys):
    assert main(["simulate", "--nodes", "2", "--devices", "8", "--experts", "64", "--top-k", "6",
                 "--layers", "2", "--overlap-degree", "3"]) == 0
    out = capsys.readouterr().out
    assert "EP16" in out and "d*" in out and "d=3 ms" in out
    assert out.strip().splitlines()[-1].startswith("model")


def test_cli_train_recommends_the_backward_degree(capsys):
    """--train: forward + backward predicted, the degree and the backward's degree recommended
    together; forced to 4 chunks on a latency-bound layer, the backward merges them all (b* = 1)."""
    args = ["simulate", "--nodes", "1", "--devices", "4", "--experts", "8", "--top-k", "2", "--tokens", "256",
            "--intra-lat", "200", "--train"]
    assert main([*args, "--overlap-degree", "4"]) == 0
    head, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "d=4/b*" in head and " 4/1 " in row, (head, row)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "d*/b*" in out and "train speedup" in out


def test_cli_deepep(capsys):
    assert main(["simulate", "--deepep"]) == 0
    out = capsys.readouterr().out
    assert "prediction" in out and "H800" in out


def test_cli_trace(tmp_path, capsys):
    from moecc.passes.placement.trace import Trace, save_trace
    rng = np.random.default_rng(0)
    ids = np.stack([np.argsort(rng.random((50, 8)), 1)[:, :2] for _ in range(3)]).astype(np.int32)
    path = tmp_path / "t.npz"
    save_trace(Trace(ids, np.ones(ids.shape, np.float32), np.zeros(50, np.int32), 8), path)
    assert main(["simulate", "--devices", "4", "--experts", "8", "--top-k", "2", "--trace", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "model" in out
    assert main(["simulate", "--devices", "4", "--experts", "16", "--top-k", "2", "--trace", str(path)]) == 2
    assert "--experts" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [(["--experts", "10"], "split evenly"),
                                         (["--overlap-degree", "9"], "1..8"),
                                         (["--inter-bw", "0", "--nodes", "2"], "inter bandwidth")])
def test_cli_refuses(args, words, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecc: error:") and words in err and "Traceback" not in err


def test_layer_refuses_top_k_above_experts():
    with pytest.raises(MoeccError, match="top-k"):
        layer_costs(LayerShape(8, 8, 8, 4, 5), _cluster())


def _skewed_trace(path, layers: int = 2, experts: int = 16, tokens: int = 2048):
    """A trace of Zipf 1.2 routing (expert 0 hottest), top-2."""
    from moecc.distributed.ep_costs import sample_ids
    from moecc.passes.placement.trace import Trace, save_trace
    ids = np.stack([sample_ids(1, tokens, experts, 2, 1.2, seed=i)[0] for i in range(layers)]).astype(np.int32)
    save_trace(Trace(ids, np.ones(ids.shape, np.float32), np.zeros(tokens, np.int32), experts), path)
    return path


def _plan(trace_path, out, method: str, replicas: int = 0, devices: int = 4):
    from moecc.passes.placement import Topology, load_trace, plan, save_plan
    tr = load_trace(trace_path)
    save_plan(plan(tr, Topology(1, devices, (tr.num_experts + replicas) // devices), method, replicas), out)
    return out


def _gains(out: str) -> list[float]:
    table = out[out.index("placement gain"):].splitlines()[2:]
    return [float(line.split()[-1].rstrip("x")) for line in table if line.strip()]


SIM = ["simulate", "--devices", "4", "--experts", "16", "--top-k", "2", "--tokens", "512", "--hidden", "1024",
       "--ffn", "512", "--gated", "--tflops", "20", "--intra-bw", "20"]


def test_cli_placement_from_plan_balances_skewed_routing(tmp_path, capsys):
    """--placement: the cost model runs on the plan's dispatch rule. On Zipf 1.2 routing the plan
    (EPLB, 4 replicas) takes load off the rank of the hot experts: its layers are predicted faster
    than contiguous experts on the same routing; a plan that is itself contiguous changes nothing."""
    trace = _skewed_trace(tmp_path / "t.npz")
    args = [*SIM, "--trace", str(trace)]
    assert main([*args, "--placement", str(_plan(trace, tmp_path / "eplb.json", "eplb", 4))]) == 0
    out = capsys.readouterr().out
    gains = _gains(out)
    assert len(gains) == 3 and all(g > 1.2 for g in gains), out           # layer0, layer1, model
    assert main([*args, "--placement", str(_plan(trace, tmp_path / "c.json", "contiguous"))]) == 0
    assert _gains(capsys.readouterr().out) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("extra, words", [(["--devices", "8"], "x 4 devices"),
                                          (["--experts", "32"], "places 16 experts"),
                                          (["--accounting", "choice"], "accounting moecc")])
def test_cli_placement_refuses_another_cluster_or_model(tmp_path, capsys, extra, words):
    trace = _skewed_trace(tmp_path / "t.npz")
    placement = _plan(trace, tmp_path / "p.json", "eplb", 4)
    args = [*SIM, "--placement", str(placement)]
    args += ["--trace", str(trace)] if extra[0] != "--experts" else ["--layers", "2", "--skew", "1.2"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecc: error:") and words in err and "Traceback" not in err, err


def test_cli_placement_layers_must_match(tmp_path, capsys):
    placement = _plan(_skewed_trace(tmp_path / "t2.npz"), tmp_path / "p.json", "eplb", 4)
    trace3 = _skewed_trace(tmp_path / "t3.npz", layers=3)
    assert main([*SIM, "--trace", str(trace3), "--placement", str(placement)]) == 2
    assert "has 2 layers" in capsys.readouterr().err
    # without a trace: a plan of 2 layers gives --layers 2 their own placements
    assert main([*SIM, "--skew", "1.2", "--layers", "2", "--placement", str(placement)]) == 0
    assert len(_gains(capsys.readouterr().out)) == 3
