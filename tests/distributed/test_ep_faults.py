"""No hangs: a rank killed inside a collective (forward or backward), a rank that stalls, a rank
started with another world size, a rank with another placement. Every surviving rank must exit
non-zero within 2x the collective timeout of the fault, with one line naming its rank and the layer;
the faulty rank too must end (no rank is left running at the deadline). Real gloo groups on
127.0.0.1, ranks forked from this process (after a warm-up, so a run takes ~0.5 s).

The campaign (slow): >= 100 runs of random routing, placements, token counts, overlap degrees
(the chunked layer and its pipelined backward in half the runs) and faults; runs without a fault must
finish with outputs bit-identical to the reference (unchunked) or within the chunked bar (1e-6
relative in float32, 1e-12 in float64). Its counts are written to
campaign.json in the test's tmp dir and printed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cases as C
import harness

TIMEOUT_S = 2.0
PHASES = ("split sizes", "dispatch hidden", "combine", "combine backward", "dispatch backward", "weights backward")


@pytest.fixture(scope="module", autouse=True)
def warm():
    """The first experts call imports torch's op machinery (seconds): do it once, before forking."""
    C.reference(dict(layer=0, world=2, tokens=[2, 2], E=2, k=1, H=4, F=4, dtype="float32",
                     routing="random", seed=0))


def run(tmp, world, cases, fault):
    stall = fault is not None and fault["kind"] == "stall"
    res = harness.spawn(tmp, world, cases, timeout_s=TIMEOUT_S, fault=fault, fork=True,
                        init_timeout_s=TIMEOUT_S if fault and fault["kind"] == "world" else 30,
                        deadline_s=60)
    hung = [r.rank for r in res if r.code is None]
    assert not hung, f"ranks {hung} still running at the deadline: {fault}"
    if fault is None:
        assert all(r.code == 0 for r in res), [r.stderr[-300:] for r in res]
        return "ok"
    t = harness.fault_time(tmp)
    if t is None:        # the fault's phase never came (no backward; "weights backward" when chunked:
                         # the pipelined backward sends them with the x gradients)
        assert all(r.code == 0 for r in res), [r.stderr[-300:] for r in res]
        return "not reached"
    for r in res:
        faulty = r.rank == fault["rank"]
        if faulty and fault["kind"] == "kill":
            assert r.code == 9
            continue
        assert r.code == 3, (fault, r.rank, r.code, r.stderr[-300:])
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: rank {r.rank}: "), line
        if fault["kind"] != "world":
            assert f"layer layer{fault['case']}" in line, line
        bound = 2 * TIMEOUT_S + (fault.get("sleep_s", 0) if faulty else 0)
        assert r.ended - t <= bound, (fault, r.rank, round(r.ended - t, 2), line)
    return fault["kind"]


SLICE = [
    dict(rank=1, case=0, kind="kill", phase="dispatch hidden"),
    dict(rank=0, case=1, kind="kill", phase="combine backward"),
    dict(rank=2, case=1, kind="kill", phase="dispatch backward", degree=4),     # the pipelined backward
    dict(rank=1, case=0, kind="stall", phase="split sizes", sleep_s=2 * TIMEOUT_S + 1, degree=4),
    dict(rank=1, case=0, kind="stall", phase="combine", sleep_s=2 * TIMEOUT_S + 1),
    dict(rank=0, case=1, kind="placement"),
    dict(rank=1, case=0, kind="world"),
]


@pytest.mark.parametrize("fault", SLICE, ids=lambda f: f"{f['kind']}-{f.get('phase', '')}")
def test_fault_every_rank_exits(tmp_path, fault):
    rng = np.random.default_rng(7)
    cases = [C.random_case(rng, i, 3) for i in range(2)]
    fault = dict(fault)
    degree = fault.pop("degree", 1)
    for c in cases:
        c.update(routing="random", tokens=[4, 3, 5], degree=degree, backward_degree=degree // 2 or None)
    assert run(tmp_path, 3, cases, fault) == fault["kind"]


def _random_fault(rng, world, layers):
    kind = rng.choice(["none", "kill", "kill", "stall", "placement", "world"])
    if kind == "none":
        return None
    f = dict(rank=int(rng.integers(world)), case=int(rng.integers(layers)), kind=str(kind))
    if kind in ("kill", "stall"):
        f["phase"] = str(rng.choice(PHASES))
    if kind == "stall":
        f["sleep_s"] = 2 * TIMEOUT_S + 1
    return f


@pytest.mark.slow
def test_fault_campaign(tmp_path):
    rng = np.random.default_rng(2026)
    counts: dict[str, int] = {}
    runs = 120
    for i in range(runs):
        world = int(rng.integers(2, 5))
        cases = [C.random_case(rng, j, world) for j in range(2)]
        fault = _random_fault(rng, world, len(cases))
        chunks = np.random.default_rng([2026, i])           # its own stream: the faults stay as they were
        if chunks.random() < 0.5:
            d = int(chunks.integers(2, 5))
            b = int(chunks.choice([b for b in range(1, d + 1) if d % b == 0]))
            for c in cases:
                c.update(degree=d, backward_degree=b)
            counts["chunked"] = counts.get("chunked", 0) + 1
        tmp = tmp_path / f"run{i}"
        outcome = run(tmp, world, cases, fault)
        if outcome == "ok":
            for j, case in enumerate(cases):
                ref = C.reference(case)
                got = torch.cat([harness.load(tmp, j, r)["y"] for r in range(world)])
                if case.get("degree", 1) == 1:
                    assert torch.equal(got, ref["y"]), (i, j)
                else:                                        # chunked: GEMM shapes change
                    bar = {"float32": 1e-6, "float64": 1e-12}[case["dtype"]]
                    err = (got - ref["y"]).abs().max().item() if got.numel() else 0.0
                    assert err <= bar * max(1.0, ref["y"].abs().max().item() if got.numel() else 0.0), (i, j, err)
        counts[outcome] = counts.get(outcome, 0) + 1
    counts["runs"], counts["hangs"] = runs, 0
    (tmp_path / "campaign.json").write_text(json.dumps(counts))
    print("campaign:", counts)
    assert runs >= 100
