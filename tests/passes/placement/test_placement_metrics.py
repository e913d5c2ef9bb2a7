"""Metrics on a hand-checked case, dispatch shares, and the plan-on-i / score-on-i+1 protocol."""
import numpy as np
import pytest

from moecc.errors import MoeccError
from moecc.passes.placement.evaluate import evaluate, window_pairs
from moecc.passes.placement.metrics import device_loads, dispatch, score
from moecc.passes.placement.plan import Plan, plan
from moecc.passes.placement.topology import parse_topology
from placement_helpers import trace_of

TOPO = parse_topology("2x2:slots=1,intra=300,inter=25")       # devices 0, 1 | 2, 3
ONE_EACH = Plan("by_hand", TOPO, np.eye(4)[None].repeat(2, 0), ("l0", "l1"))   # expert e on device e
# token:            t0        t1        t2
TRACE = trace_of([[[0, 1], [0, 2], [2, 3]],               # layer 0
                  [[2, 3], [0, 3], [1, 0]]], num_experts=4)  # layer 1


def test_hand_checked_counts():
    m = score(ONE_EACH, TRACE, token_bytes=8192)
    assert m.device_sends == 12          # every token uses 2 devices in both layers
    assert m.node_sends == 4 + 4         # t1 uses both nodes, t0 and t2 one
    assert m.device_moves == 2           # t0: {0,1} -> {2,3}, t2: {2,3} -> {0,1}; t1 keeps device 0
    assert m.node_moves == 2             # t0: node 0 -> 1, t2: node 1 -> 0
    assert (m.device_traffic, m.node_traffic) == (14, 10)
    assert m.balancedness == pytest.approx(3 / 4)      # loads [2,1,2,1] and [2,1,1,2]
    # layer 0 from home devices t mod 4: only t1 (device 1) crosses, to node 1;
    # layer 1: t0 from device 0 -> node 1, t1 from device 0 (kept) -> node 1, t2 from 2 -> node 0
    assert m.inter_node_sends == 1 + 3
    b, inter, intra = 8192, 25e9, 300e9
    # rail-aligned: a send to node n lands on the device of the source's local rank there.
    # layer 0: t1 (device 1) -> device 3, which forwards to 2; busiest device 1 or 3 (1 inter,
    # 1 intra each way). layer 1: t0 and t1 (source 0) -> device 2, which forwards both to 3, and
    # t2 (source 2) -> device 0 (forwards to 1); busiest device 2: 2 inter received + 1 sent,
    # 2 intra sent -- dispatch and combine
    assert m.a2a_ms == pytest.approx(1e3 * 2 * ((b / inter + b / intra) + (2 * b / inter + 2 * b / intra)))


def test_dropped_choices_are_not_sent():
    t = trace_of([[[0, -1], [1, 3]], [[-1, -1], [2, 3]]], num_experts=4)
    m = score(ONE_EACH, t)
    assert (m.device_sends, m.node_sends) == (1 + 2 + 0 + 2, 1 + 2 + 0 + 1)
    assert m.device_moves == 0 and m.node_moves == 0    # t0 has nothing in layer 1: nothing moves
    np.testing.assert_array_equal(device_loads(ONE_EACH, t), [[1, 1, 0, 1], [0, 0, 1, 1]])


def test_dispatch_honours_shares():
    share = np.array([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    dev = dispatch(share, np.zeros((1000, 1), dtype=np.int64))
    assert abs((dev == 0).mean() - 0.25) < 0.002 and set(np.unique(dev)) == {0, 1}
    assert (dispatch(share, np.ones((10, 1), dtype=np.int64)) == 2).all()


def test_scored_on_the_next_window():
    # window 0: everything on expert 0; window 1: everything on expert 1
    ids = [[[0, 2]] * 8 + [[1, 3]] * 8]
    t = trace_of(ids, num_experts=4, windows=np.repeat([0, 1], 8))
    topo = parse_topology("1x2:slots=3")
    res = evaluate(t, topo, ["eplb"], replicas=2)["eplb"]
    expected = score(plan(t.select(0), topo, "eplb", 2), t.select(1))
    assert res.balancedness == pytest.approx(expected.balancedness)
    assert res.tokens == 8 and res.device_sends == expected.device_sends
    assert len(window_pairs(t)) == 1
    with pytest.raises(MoeccError, match="at least 2 windows .* this one has 1"):
        evaluate(t.select(0), topo, ["eplb"], replicas=2)
