"""Expert-parallel runtime on real gloo process groups (2 and 4 processes on 127.0.0.1): outputs and
every gradient bit-identical (torch.equal) to torch.ops.moecc.experts in one process on the
rank-major concatenated batch (with replicas: over the physical copies, cases.reference), and the
rows sent equal to the placement metrics of the same plan on the same trace.

Each world size is one run of all its cases, ranks forked from the test process after a warm-up.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cases as C
import harness
from moecc.passes.placement import Plan, Topology, plan, score
from moecc.passes.placement.metrics import device_loads
from moecc.passes.placement.synthetic import synthetic_trace


def _case(layer, world, tokens, E, k, dtype, routing="random", **kw):
    return dict(layer=layer, world=world, tokens=tokens, E=E, k=k, H=8, F=6, dtype=dtype,
                routing=routing, seed=100 + layer, **kw)


CASES2 = [
    _case(0, 2, [5, 7], 4, 2, "float32"),
    _case(1, 2, [9, 0], 4, 3, "float64", bias=True),                  # rank 1 has no tokens
    _case(2, 2, [6, 4], 4, 2, "float32", "one_expert", hot=0),        # rank 1 receives nothing
    _case(3, 2, [3, 8], 8, 2, "float64", "skip_experts"),             # rank 1's experts all empty
    _case(4, 2, [7, 7], 6, 4, "float32", "drops", act="gelu"),        # k=4, empty slots
    _case(5, 2, [4, 9], 4, 1, "float64", "one_expert", hot=3),        # rank 0 computes nothing
    _case(6, 2, [5, 6], 4, 4, "float64", "drops"),                    # S = E slots (expert-choice shape)
]

_SHARE4 = np.zeros((6, 4))                                            # replicas, unequal shares
_SHARE4[0, [0, 1]] = 0.5
_SHARE4[1, [2, 3]] = [0.3, 0.7]
_SHARE4[[2, 3, 4, 5], [3, 2, 1, 0]] = 1.0
_LOCAL = np.zeros((4, 4))                                             # 2 nodes x 2 devices
_LOCAL[0, [0, 2]] = 0.5                                               # expert 0 node-local
_LOCAL[[1, 2, 3], [1, 2, 3]] = 1.0

_TRACE = synthetic_trace(layers=1, experts=8, top_k=2, tokens=48, windows=1, seed=3)
_EPLB = plan(_TRACE, Topology(1, 4, slots=3), "eplb", replicas=4)

CASES4 = [
    _case(0, 4, [4, 0, 6, 3], 8, 3, "float32"),
    _case(1, 4, [5, 5, 5, 5], 6, 3, "float64", share=_SHARE4.tolist()),
    _case(2, 4, [6, 6, 6, 6], 4, 2, "float32", share=_LOCAL.tolist(), local=[True, False, False, False],
          per_node=2, round_robin=True),
    _case(3, 4, [12, 12, 12, 12], 8, 2, "float32", "given", share=_EPLB.share[0].tolist(),
          ids=_TRACE.expert_ids[0].tolist(), round_robin=True),
    _case(4, 4, [2, 7, 0, 5], 4, 2, "float64", "one_expert", hot=2),
]
_TRACE2 = synthetic_trace(layers=2, experts=4, top_k=2, tokens=24, windows=1, seed=5)
_LOCAL2 = Plan("hand", Topology(2, 2, slots=2), np.stack([_LOCAL, _LOCAL]), ("layer5", "layer6"),
               local=np.array([[True, False, False, False]] * 2))
CASES4 += [_case(5 + l, 4, [6, 6, 6, 6], 4, 2, "float32", "given", share=_LOCAL.tolist(),
                 local=[True, False, False, False], per_node=2, round_robin=True,
                 ids=_TRACE2.expert_ids[l].tolist(), carry=l == 1) for l in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    C.reference(CASES2[0])              # warm-up (lazy imports of the op machinery) before forking
    out = {}
    for world, cases in ((2, CASES2), (4, CASES4)):
        tmp = tmp_path_factory.mktemp(f"ep{world}")
        res = harness.spawn(tmp, world, cases, timeout_s=60, deadline_s=240, fork=True)
        assert all(r.code == 0 for r in res), [(r.rank, r.code, r.stderr[-500:]) for r in res]
        out[world] = tmp
    return out


def _check(tmp, case, i):
    ref = C.reference(case)
    cps = C.copies(case)
    off = 0
    for r in range(case["world"]):
        got = harness.load(tmp, i, r)
        T = case["tokens"][r]
        for name, key in (("y", "y"), ("grad_x", "grad_x"), ("grad_weights", "grad_weights")):
            assert torch.equal(got[key], ref[name][off:off + T]), (i, r, name)
        idx = [cps.index((e, r)) for e in got["held"]]
        for n in ("w_in", "w_out", "b_in", "b_out"):
            if f"grad_{n}" in ref:
                assert torch.equal(got[f"grad_{n}"], ref[f"grad_{n}"][idx]), (i, r, n)
        off += T


@pytest.mark.parametrize("i", range(len(CASES2)))
def test_two_ranks_bit_identical(runs, i):
    _check(runs[2], CASES2[i], i)


@pytest.mark.parametrize("i", [i for i, c in enumerate(CASES4) if not c.get("carry")])
def test_four_ranks_bit_identical(runs, i):
    _check(runs[4], CASES4[i], i)


def test_no_replicas_reference_is_the_plain_op():
    """Without replicas the physical reference is torch.ops.moecc.experts on the layer's weights."""
    case = CASES2[4]
    p = C.problem(case)
    y = torch.ops.moecc.experts(p["x"], p["ids"], p["weights"], p["w_in"], p["w_out"], None, None,
                                C.spec(case).to_json(), "reference")
    assert torch.equal(C.reference(case)["y"], y)


def _sends(tmp, i, world):
    return [harness.load(tmp, i, r) for r in range(world)]


def test_sends_equal_plan_metrics_eplb(runs):
    """EPLB plan with replicas on a synthetic trace: hidden rows sent = device_sends, pairs each
    rank computes = the metrics' device loads."""
    got = _sends(runs[4], 3, 4)
    m = score(_EPLB, _TRACE)
    assert sum(sum(g["row_send"]) for g in got) == m.device_sends
    received = np.sum([g["send"] for g in got], axis=0)                 # pairs to each rank
    assert received.tolist() == device_loads(_EPLB, _TRACE)[0].astype(int).tolist()


def test_sends_equal_plan_metrics_node_local(runs):
    """A plan with a node-local expert (2 nodes x 2 devices), tokens on their home devices."""
    got = _sends(runs[4], 2, 4)
    case = CASES4[2]
    p = C.problem(case)
    trace_ids = p["ids"].numpy()[None]                                   # [1, T, k] trace order
    from moecc.passes.placement.trace import Trace
    trace = Trace(trace_ids, np.ones(trace_ids.shape, np.float32), np.zeros(trace_ids.shape[1]), 4)
    pl = Plan("hand", Topology(2, 2, slots=2), _LOCAL[None], ("layer2",),
              local=np.array([[True, False, False, False]]))
    m = score(pl, trace)
    assert sum(sum(g["row_send"]) for g in got) == m.device_sends
    assert np.sum([g["send"] for g in got], axis=0).tolist() == device_loads(pl, trace)[0].astype(int).tolist()


def test_sends_equal_plan_metrics_two_layers_node_local(runs):
    """Two layers with a node-local expert: the second layer's token nodes carried from the first
    (Layout.node): sends and loads of both layers equal the metrics of the same plan and trace."""
    got = [_sends(runs[4], i, 4) for i in (5, 6)]
    m = score(_LOCAL2, _TRACE2)
    assert sum(sum(g["row_send"]) for layer in got for g in layer) == m.device_sends
    loads = device_loads(_LOCAL2, _TRACE2).astype(int).tolist()
    assert [np.sum([g["send"] for g in layer], axis=0).tolist() for layer in got] == loads
