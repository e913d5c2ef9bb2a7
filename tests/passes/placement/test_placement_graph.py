"""The graph planner's pieces (graphs, partition, alignment) and its quality on structured traces."""
import numpy as np

from moecc.passes.placement.evaluate import evaluate
from moecc.passes.placement.graph_planner import align, match
from moecc.passes.placement.graphs import (coactivation, expert_graph, layer_graph, model_graph,
                                           token_counts, token_parts)
from moecc.passes.placement.partition import partition
from moecc.passes.placement.chains import chain_nodes, cluster_graph
from moecc.passes.placement.refine import communities, modularity, refine
from moecc.passes.placement.synthetic import synthetic_trace
from moecc.passes.placement.topology import parse_topology
from placement_helpers import trace_of


def test_graph_weights_sum_to_loads():
    t = synthetic_trace(layers=2, experts=8, top_k=3, tokens=50, windows=1, seed=2)
    w, coact, flow = layer_graph(t.expert_ids[1], t.expert_ids[0], 8)
    np.testing.assert_allclose(coact.sum(1), w)          # co-activation rows: / (k - 1)
    np.testing.assert_allclose(flow.sum(0), w)           # flow columns: / k
    np.testing.assert_allclose(coact, coact.T)
    g = expert_graph(t)
    assert g.number_of_nodes() == 16
    assert g.nodes[(1, 3)]["load"] == w[3]
    e, f = np.unravel_index(np.argmax(flow), flow.shape)
    assert g.edges[(0, int(e)), (1, int(f))] == {"weight": flow[e, f], "kind": "flow"}


def test_partition_keeps_cliques_together():
    # two cliques {0..3} and {4..7} of equal load, shuffled ids: 2 parts of 4 slots
    perm = np.random.default_rng(0).permutation(8)
    A = np.zeros((8, 8))
    for clique in (perm[:4], perm[4:]):
        A[np.ix_(clique, clique)] = 5.0
    np.fill_diagonal(A, 0)
    part = partition(A[None], None, np.ones((1, 8)), np.ones((1, 8), bool), np.full((1, 2), 4),
                     np.full((1, 2), 4.0))[0]
    assert len(set(part[perm[:4]])) == 1 and len(set(part[perm[4:]])) == 1
    assert part[perm[0]] != part[perm[4]]


def test_partition_caps_and_groups():
    rng = np.random.default_rng(1)
    group = np.concatenate([np.arange(20), np.repeat(np.arange(20, 25), 2)])   # 5 experts x 2
    for sigma, load_ok in ((0.5, True), (1.5, False)):          # the second: caps not always met
        w = rng.lognormal(0, sigma, size=(20, 25))[:, group]    # copies weigh the same
        A = rng.random((20, 30, 30))
        A = A + A.swapaxes(1, 2)
        cap = w.sum(1, keepdims=True) / 5 * 1.1
        part = partition(A, None, w, np.ones((20, 30), bool), np.full((20, 5), 6),
                         cap.repeat(5, 1), group=group[None].repeat(20, 0))
        over = []
        for b in range(20):
            assert (np.bincount(part[b], minlength=5) <= 6).all()
            assert (part[b, 20::2] != part[b, 21::2]).all()          # copies on different parts
            over.append(np.bincount(part[b], w[b], 5).max() / cap[b, 0])
        if load_ok:     # single exchanges cannot always reach the cap (here 1 problem, by 0.6 %)
            assert sum(o > 1 + 1e-9 for o in over) <= 1 and max(over) < 1.01


def test_align_follows_the_previous_layer():
    # layer 1 is layer 0 with parts renamed 0 <-> 1; every token chooses the same expert in both
    member = np.eye(2)[[[0, 0, 1, 1], [1, 1, 0, 0]]]                        # [L=2, E=4, P=2]
    ids = np.tile(np.array([[0], [1], [2], [3], [-1]]), (2, 1, 1))          # [L, T=5, k=1]
    renamed, rename = align(member, ids, 1)
    np.testing.assert_array_equal(rename, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(renamed[1], member[0])
    np.testing.assert_array_equal(match(np.array([[1.0, 9.0], [8.0, 2.0]])), [1, 0])
    # devices (2 nodes x 2) are renamed only inside their node
    member = np.eye(4)[[[0, 1, 2, 3], [1, 0, 3, 2]]]
    np.testing.assert_array_equal(align(member, ids, 2)[1][1], [1, 0, 3, 2])


def test_token_counts_are_the_factored_flow():
    """U[l-1]^T U[l] / k equals member[l-1]^T flow[l] member[l] (the flow edges, factored)."""
    t = synthetic_trace(layers=3, experts=12, top_k=3, tokens=80, windows=1, seed=4)
    _, _, flow = model_graph(t)
    part_of = np.random.default_rng(0).integers(0, 4, size=(3, 12))
    member = np.eye(4)[part_of]
    U = token_counts(t.expert_ids, part_of, 4)
    np.testing.assert_allclose(U, token_parts(t.expert_ids, member))
    for l in (1, 2):
        np.testing.assert_allclose(U[l - 1].T @ U[l] / 3, member[l - 1].T @ flow[l] @ member[l],
                                   rtol=1e-5)


def test_coactivation_matches_the_layer_graph():
    t = synthetic_trace(layers=2, experts=10, top_k=3, tokens=60, windows=1, seed=5)
    ids = t.expert_ids.copy()
    ids[0, :5, 2] = -1                                                      # dropped choices
    t = trace_of(ids, 10)
    coact = coactivation(t)
    for l in range(2):
        np.testing.assert_allclose(coact[l], layer_graph(ids[l], None, 10)[1], rtol=1e-6)


def test_communities_find_planted_clusters():
    # three 5-cliques with weak links between them: label propagation labels each clique alike
    rng = np.random.default_rng(3)
    perm = rng.permutation(15)
    A = np.full((15, 15), 0.1)
    for q in range(3):
        A[np.ix_(perm[5 * q:5 * q + 5], perm[5 * q:5 * q + 5])] = 10.0
    np.fill_diagonal(A, 0)
    label = communities(A[None].astype(np.float32), A.sum(1)[None], np.ones((1, 15), bool),
                        neighbours=4, iters=16)[0]
    assert [len(set(label[perm[5 * q:5 * q + 5]])) for q in range(3)] == [1, 1, 1]
    assert len(set(label)) == 3


def test_refine_swaps_keep_counts_and_caps():
    # two parts, two cliques dealt out alternately: swaps reunite them, counts and loads kept
    A = np.zeros((8, 8), np.float32)
    A[:4, :4] = A[4:, 4:] = 1.0
    np.fill_diagonal(A, 0)
    part = np.array([[0, 1, 0, 1, 0, 1, 0, 1]])
    out = refine(A[None], np.ones((1, 8)), part, np.ones((1, 8), bool), np.full((1, 2), 4.0))
    assert len(set(out[0, :4])) == 1 and len(set(out[0, 4:])) == 1
    assert np.bincount(out[0], minlength=2).tolist() == [4, 4]


def test_fewer_cross_node_sends_than_eplb_on_structured_traces():
    """A regression guard, not the benchmark: tokens of 8 topics favour 8 expert clusters."""
    t = synthetic_trace(layers=6, experts=64, top_k=4, tokens=2000, windows=2, topics=8,
                        affinity=5.0, seed=1)
    topo = parse_topology("4x4:slots=5")
    nxt = evaluate(t, topo, ["eplb", "graph"], replicas=16)
    assert nxt["graph"].node_traffic <= 0.75 * nxt["eplb"].node_traffic
    assert nxt["graph"].inter_node_sends <= 0.65 * nxt["eplb"].inter_node_sends
    same = evaluate(t, topo, ["eplb", "graph"], replicas=16, in_sample=True)
    assert same["graph"].balancedness >= same["eplb"].balancedness - 0.01


def test_unstructured_golden_layers_still_place():
    # k = 1, a single hot expert: the graph planner must still use its replicas for it
    t = trace_of([[[0]] * 12 + [[1]], [[1]] * 12 + [[0]]], num_experts=2)
    from moecc.passes.placement.plan import plan
    p = plan(t, parse_topology("1x4:slots=1"), "graph", replicas=2)
    assert (p.share[0, 0] > 0).sum() == 3 and (p.share[1, 1] > 0).sum() == 3


def test_even_out_shifts_replica_shares_to_the_idle_device():
    from moecc.passes.placement.shares import even_out
    # expert 0 (load 10) has copies on devices 0 and 1; device 0 also holds expert 1 (load 4)
    share = np.zeros((1, 2, 2))
    share[0, 0] = [0.5, 0.5]
    share[0, 1, 0] = 1.0
    w = np.array([[10.0, 4.0]])
    out = even_out(share, w)
    load = np.einsum("le,led->ld", w, out)
    np.testing.assert_allclose(load, [[7.0, 7.0]])                # 4 + 3 and 7
    np.testing.assert_allclose(out.sum(-1), 1.0)
    assert ((out > 0) == (share > 0)).all()                         # same copies, same slots


def test_modularity_tells_clusters_from_noise():
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(4), 8)[None]                                # 4 clusters of 8
    planted = np.where(label[0][:, None] == label[0][None, :], 5.0, 0.2)
    np.fill_diagonal(planted, 0)
    noise = rng.random((32, 32))
    noise = noise + noise.T
    np.fill_diagonal(noise, 0)
    A = np.stack([planted, noise]).astype(np.float32)
    q = modularity(A, label.repeat(2, 0), A.sum(2))
    assert q[0] > 0.5 and abs(q[1]) < 0.05


def test_chains_put_a_tokens_clusters_on_one_node():
    # layer 0 clusters {0..3}, {4..7}; tokens of the first go on to {4..7} in layer 1, the others
    # to {0..3}: each chain crosses the cluster ids, and each lands on one node
    ids = np.array([[[0, 1]] * 20 + [[5, 6]] * 20, [[4, 7]] * 20 + [[2, 3]] * 20])   # [2, 40, 2]
    label = np.array([[0] * 4 + [4] * 4, [0] * 4 + [4] * 4])
    w = np.ones((2, 8))
    graph, _ = cluster_graph(label, w, ids)
    assert sorted(graph.edges) == [((0, 0), (1, 4)), ((0, 4), (1, 0))]
    node = chain_nodes(label, w, ids, 2)
    assert node[0, 0] == node[1, 4] != node[0, 4] == node[1, 0]


def test_clustered_plan_keeps_hidden_states_on_their_node():
    """Topics keep their clusters through the layers: chained clusters share a node, so few
    tokens move between nodes from one layer to the next (a regression guard)."""
    t = synthetic_trace(layers=6, experts=64, top_k=4, tokens=1500, windows=2, topics=8,
                        affinity=6.0, seed=2)
    topo = parse_topology("4x4:slots=5")
    chained, unchained = (evaluate(t, topo, {"graph": "graph"}, replicas=16,
                                   options={"graph": {"chain_pull": pull}})["graph"]
                          for pull in (0.5, 0.0))
    assert chained.node_moves < 0.5 * unchained.node_moves
    assert chained.node_traffic < unchained.node_traffic
