"""Node-local experts: a copy on every node, and a token's choice of one stays on its node."""
import json

import numpy as np
import pytest

from moecc.cli import main
from moecc.errors import MoeccError
from moecc.passes.placement.evaluate import evaluate
from moecc.passes.placement.graphs import token_node
from moecc.passes.placement.metrics import dispatch, routes
from moecc.passes.placement.plan import Plan, load_plan, plan, save_plan
from moecc.passes.placement.synthetic import synthetic_trace
from moecc.passes.placement.topology import parse_topology
from moecc.passes.placement.trace import save_trace

TOPO = parse_topology("4x4:slots=9")                           # 144 slots: 128 experts + 16 replicas
TRACE = synthetic_trace(layers=8, experts=128, top_k=8, tokens=2048, windows=2, topics=8,
                        affinity=4.0, seed=3)


def test_dispatch_keeps_local_experts_on_the_tokens_node():
    share = np.array([[0.5, 0.0, 0.5, 0.0]])                    # expert 0 on devices 0 | 2
    ids = np.zeros((6, 1), dtype=np.int64)
    node = np.array([0, 1, 0, 1, 0, 1])
    static = dispatch(share, ids)
    assert set(static[:, 0]) == {0, 2}                          # by the hash, either node
    local = dispatch(share, ids, np.array([True]), node, per_node=2)
    np.testing.assert_array_equal(local[:, 0], 2 * node)        # device 0 on node 0, 2 on node 1
    held_on_0 = np.array([[1.0, 0.0, 0.0, 0.0]])                # no copy on node 1: by the shares
    assert (dispatch(held_on_0, ids, np.array([True]), node, per_node=2) == 0).all()


def test_token_node_majority_then_best_rank():
    nodes = np.array([[1, 0, 0], [2, 1, -1], [-1, -1, -1], [3, 3, 1]])
    np.testing.assert_array_equal(token_node(nodes, 4, np.array([9, 9, 2, 9])), [0, 2, 2, 3])


def test_local_experts_have_a_copy_per_node_and_their_tokens_stay():
    p = plan(TRACE.select(0), TOPO, "graph", replicas=16, local_replicas=12)
    assert (p.local.sum(1) == 12 // 3).all()                    # 3 replicas per local expert
    G = TOPO.devices_per_node
    for l in range(len(p.layers)):
        for e in np.flatnonzero(p.local[l]):
            assert sorted({d // G for d in np.flatnonzero(p.share[l, e])}) == [0, 1, 2, 3]
    assert ((p.share > 0).sum(1) <= TOPO.slots).all() and p.replicas <= 16
    node = (np.arange(TRACE.num_tokens) % TOPO.devices) // G
    for l, raw in enumerate(routes(p, TRACE)):                  # follow the tokens' nodes
        ids = TRACE.expert_ids[l]
        mine = p.local[l][ids]
        assert mine.any() and (raw[mine] // G == np.broadcast_to(node[:, None], ids.shape)[mine]).all()
        node = token_node(np.where(raw >= 0, raw // G, -1), TOPO.nodes, node)


def test_local_experts_cut_node_traffic_on_clustered_traces():
    # (with top-4 routing they do not: a token's few experts mostly share its topic's node already)
    labels = {"static": "graph", "local": "graph"}
    r = evaluate(TRACE, TOPO, labels, replicas=16, options={"local": {"local_replicas": 9}})
    assert r["local"].node_traffic < 0.97 * r["static"].node_traffic
    assert r["local"].balancedness > 0.9 * r["static"].balancedness


def test_local_plan_round_trips_through_json(tmp_path):
    p = plan(TRACE.select(0), TOPO, "graph", replicas=16, local_replicas=6)
    save_plan(p, tmp_path / "placement.json")
    doc = json.loads((tmp_path / "placement.json").read_text())
    assert doc["layers"][0]["local"] == np.flatnonzero(p.local[0]).tolist()
    back = load_plan(tmp_path / "placement.json")
    np.testing.assert_array_equal(back.local, p.local)
    np.testing.assert_allclose(back.share, p.share, atol=1e-8)


def test_bad_local_replicas_and_local_shape():
    with pytest.raises(MoeccError, match="local_replicas=20 must be between 0 and the 16 replicas"):
        plan(TRACE.select(0), TOPO, "graph", replicas=16, local_replicas=20)
    with pytest.raises(MoeccError, match=r"local must be \[layers, experts\]"):
        Plan("x", TOPO, np.eye(16)[None].repeat(2, 0), ("a", "b"), local=np.zeros((2, 3), bool))


def test_cli_local_replicas(tmp_path):
    save_trace(TRACE, tmp_path / "trace.npz")
    out = tmp_path / "placement.json"
    assert main(["plan", "--trace", str(tmp_path / "trace.npz"), "--topology", "4x4:slots=9",
                 "--replicas", "16", "--local-replicas", "9", "--out", str(out)]) == 0
    assert load_plan(out).local.sum(1).tolist() == [3] * 8


def test_planned_sources_of_local_experts_are_where_their_tokens_come_from():
    # the MoEfied MiniLM trace (E = 64, top-8): one expert per layer is chosen by every token and
    # is copied on both nodes, so a token's node after that layer is decided by the hash of its
    # shares; the planner must follow the tokens as the dispatch does, or it sets the node caps
    # for the wrong nodes (it once did: in-sample balancedness 0.94 instead of 0.99)
    from pathlib import Path

    from moecc.passes.placement import graph_planner
    from moecc.passes.placement.trace import load_trace
    trace = load_trace(Path(__file__).parents[3] / "passes/placement/bench/minilm64_trace.npz")
    window, topo = trace.select(0), parse_topology("2x4:slots=9")
    seen = []
    original = graph_planner.local_sources
    try:
        graph_planner.local_sources = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
        p = plan(window, topo, "graph", replicas=8, local_replicas=4)
    finally:
        graph_planner.local_sources = original
    assert p.local.any() and seen
    G = topo.devices_per_node
    for l, raw in enumerate(routes(p, window)):
        ids = window.expert_ids[l]
        for e in np.flatnonzero(p.local[l]):
            real = np.bincount(raw[ids == e] // G, minlength=topo.nodes) / (ids == e).sum()
            np.testing.assert_allclose(seen[-1][l, e], real, atol=0.02)
    static = evaluate(window, topo, ["graph"], 8, in_sample=True)["graph"]
    local = evaluate(window, topo, {"l": "graph"}, 8, options={"l": {"local_replicas": 4}},
                     in_sample=True)["l"]
    assert local.balancedness > static.balancedness - 0.01


def test_an_expert_too_hot_for_one_device_per_node_gets_more_copies():
    from moecc.passes.placement.graph_planner import local_experts
    w = np.array([[50.0, 10, 10, 10, 5, 5, 5, 5]])             # expert 0: half the load
    per = local_experts(w, replicas=4, nodes=2, per_node=4)     # one device's mean share: 1/8
    np.testing.assert_array_equal(per, [[2, 1, 0, 0, 0, 0, 0, 0]])   # 2 x 2 - 1 = 3, then 1
    np.testing.assert_array_equal(local_experts(w, 2, 2, 4), [[0] * 8])   # 3 do not fit in 2
    np.testing.assert_array_equal(local_experts(w, 6, 4, 2), [[1, 1, 0, 0, 0, 0, 0, 0]])
    # on the MoEfied MiniLM (E = 8, top-2) expert 2 of layer 0 takes half of all tokens: with one
    # copy per node that copy alone was twice a device's mean (in-sample balancedness 0.55)
    from pathlib import Path

    from moecc.passes.placement.trace import load_trace
    trace = load_trace(Path(__file__).parents[3] / "passes/placement/bench/minilm_trace.npz").select(0)
    r = evaluate(trace, parse_topology("2x4:slots=3"), {"g": "graph", "l": "graph"}, 8,
                 options={"l": {"local_replicas": 4}}, in_sample=True)
    assert r["l"].balancedness > r["g"].balancedness - 0.05
