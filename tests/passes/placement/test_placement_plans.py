"""Plans of every method: a golden hand-checked case, invariants on random traces, bad input."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moecc.errors import MoeccError
from moecc.passes.placement.metrics import score
from moecc.passes.placement.plan import METHODS, Plan, from_json, load_plan, plan, save_plan, to_json
from moecc.passes.placement.topology import Topology, parse_topology
from placement_helpers import random_trace, trace_of

# one layer, k=1, loads [4, 3, 2, 1] on 1 node x 2 devices x 2 slots
GOLDEN = trace_of([[[0], [0], [0], [0], [1], [1], [1], [2], [2], [3]]], num_experts=4)
TOPO = parse_topology("1x2:slots=2")


@pytest.mark.parametrize("method, devices, balancedness", [
    ("contiguous", [[0, 1], [2, 3]], 5 / 7),     # loads 7, 3
    ("round_robin", [[0, 2], [1, 3]], 5 / 6),    # loads 6, 4
    ("eplb", [[0, 3], [1, 2]], 1.0),             # 4 + 1, 3 + 2
    ("graph", [[0, 3], [1, 2]], 1.0),
])
def test_golden(method, devices, balancedness):
    p = plan(GOLDEN, TOPO, method)
    assert p.device_experts(0) == devices
    assert score(p, GOLDEN).balancedness == pytest.approx(balancedness)
    assert p.expert_devices(0)[0] == [(devices[0].index(0) and 1 or 0, 1.0)]


def test_golden_json(tmp_path):
    p = plan(GOLDEN, TOPO, "eplb")
    doc = to_json(p)
    assert doc["layers"][0]["devices"] == [[0, 3], [1, 2]]
    assert doc["layers"][0]["experts"] == [[[0, 1.0]], [[1, 1.0]], [[1, 1.0]], [[0, 1.0]]]
    save_plan(p, tmp_path / "placement.json")
    back = load_plan(tmp_path / "placement.json")
    np.testing.assert_array_equal(back.share, p.share)
    assert back.topology == TOPO and back.method == "eplb"


def test_replica_shares_in_json():
    # expert 0 takes 6 of 8 tokens: with 2 replicas on 2 devices x 2 slots, it is split in two
    t = trace_of([[[0], [0], [0], [0], [0], [0], [1], [2]]], num_experts=3)
    for method in ("eplb", "graph"):
        p = plan(t, TOPO, method, replicas=1)
        rows = to_json(p)["layers"][0]["experts"]
        assert sorted(d for d, _ in rows[0]) == [0, 1] and [s for _, s in rows[0]] == [0.5, 0.5]
        assert score(p, t).balancedness == pytest.approx(1.0)


def check_invariants(p: Plan, topology: Topology, num_experts: int, replicas: int):
    share = p.share                                             # [L, E, D]
    assert share.shape[1:] == (num_experts, topology.devices)
    np.testing.assert_allclose(share.sum(-1), 1.0, atol=1e-9)  # every expert placed, shares sum to 1
    assert ((share > 0).sum(1) <= topology.slots).all()        # slots respected
    assert ((share > 0).sum((1, 2)) <= num_experts + replicas).all()   # replica budget
    assert (share >= 0).all()


@st.composite
def cases(draw):
    nodes, per_node = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    D = nodes * per_node
    E = draw(st.integers(max(2, D // 2), 24))
    k = draw(st.integers(1, min(4, E)))
    slots = -(-E // D) + draw(st.integers(0, 2))
    replicas = draw(st.integers(0, D * slots - E))
    return dict(nodes=nodes, per_node=per_node, E=E, k=k, slots=slots, replicas=replicas,
                layers=draw(st.integers(1, 3)), tokens=draw(st.integers(8, 120)),
                seed=draw(st.integers(0, 2 ** 16)), skew=draw(st.floats(0.0, 2.5)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_invariants_on_random_traces(c):
    trace = random_trace(np.random.default_rng(c["seed"]), c["layers"], c["E"], c["k"], c["tokens"],
                         skew=c["skew"])
    topo = Topology(c["nodes"], c["per_node"], c["slots"])
    for method in METHODS:
        r = 0 if method in ("contiguous", "round_robin") else c["replicas"]
        if method == "eplb" and (c["E"] + r) % topo.devices:
            with pytest.raises(MoeccError, match="must be a multiple of the"):
                plan(trace, topo, method, r)
            continue
        p = plan(trace, topo, method, r)
        check_invariants(p, topo, c["E"], r)
        if method == "graph":       # the cluster path too (on by default from 32 experts)
            check_invariants(plan(trace, topo, method, r, clusters=True, min_modularity=0.0),
                             topo, c["E"], r)
        m = score(p, trace)
        assert 0.0 < m.balancedness <= 1.0 + 1e-9
        assert m.node_sends <= m.device_sends <= trace.num_tokens * trace.num_layers * trace.top_k


def test_graph_replicates_the_hottest_experts():
    trace = random_trace(np.random.default_rng(1), layers=2, experts=32, k=4, tokens=2000, skew=1.5)
    topo = parse_topology("2x4:slots=5")
    p = plan(trace, topo, "graph", replicas=8)
    check_invariants(p, topo, 32, 8)
    copies = (p.share > 0).sum(-1)                              # [L, E]
    hottest = trace.load().argmax(1)
    assert (copies.sum(1) == 40).all()                          # all 8 replicas used
    assert (copies[[0, 1], hottest] == copies.max(1)).all() and (copies.max(1) >= 2).all()


def test_bad_input_names_the_numbers():
    trace = random_trace(np.random.default_rng(0), layers=1, experts=64, k=2, tokens=100)
    with pytest.raises(MoeccError, match=r"64 experts \+ 0 replicas = 64 exceed the 8 devices × 7 slots"):
        plan(trace, parse_topology("2x4:slots=7"), "graph")
    with pytest.raises(MoeccError, match=r"experts \+ replicas \(64 \+ 4 = 68\) must be a multiple of "
                                         r"the 8 devices"):
        plan(trace, parse_topology("2x4:slots=9"), "eplb", replicas=4)
    with pytest.raises(MoeccError, match="method contiguous places no replicas, but replicas=8"):
        plan(trace, parse_topology("2x4:slots=9"), "contiguous", replicas=8)
    with pytest.raises(MoeccError, match="unknown placement method 'best'"):
        plan(trace, parse_topology("2x4:slots=9"), "best")


def test_plan_rejects_broken_shares():
    share = np.zeros((1, 2, 2))
    share[0, 0, 0] = 1.0
    with pytest.raises(MoeccError, match="expert 1 of layer a has shares summing to 0.000000, not 1 "
                                         r"\(not placed\)"):
        Plan("x", parse_topology("1x2:slots=1"), share, ("a",))
    share[0, 1, 0] = 1.0
    with pytest.raises(MoeccError, match="device 0 holds 2 experts in layer a but has 1 slots"):
        Plan("x", parse_topology("1x2:slots=1"), share, ("a",))
    doc = to_json(Plan("x", parse_topology("1x2:slots=2"), share, ("a",)))
    doc["layers"][0]["devices"] = [[0], [1]]
    with pytest.raises(MoeccError, match="'devices' and 'experts' disagree"):
        from_json(doc)
