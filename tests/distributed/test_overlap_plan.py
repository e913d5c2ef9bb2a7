"""passes/overlap: the per-layer degree from measured constants, the override, schedule.json, and the
experts layers found in an exported graph."""
import json
from pathlib import Path

import pytest
import torch

from moecc.distributed.costmodel import DEGREE_TOLERANCE
from moecc.errors import MoeccError
from moecc.passes.overlap import LayerShape, OverlapPlan, apply, experts_layers, make, plan_layers
from moecc.spec import MoESpec, RouterSpec

# constants as the probe reports them (s, s/byte, FLOP/s, s per call, s per token, ...)
K = {"alpha": 1e-3, "beta": 1e-8, "flops": 5e9, "chunk": 2e-4, "plan": 1e-6, "plan_fixed": 1e-4,
     "sums": 1e-6, "sums_fixed": 1e-4}
BIG = LayerShape("moe0", 512, 256, 512, 16, 2, True, 512)
TINY = LayerShape("moe1", 8, 16, 32, 8, 2, True, 0)


def test_degree_is_the_smallest_within_tolerance_and_latency_bound_layers_stay_whole():
    comm = {**K, "beta": 1e-7}                  # comm:compute near 1 (with K's beta overlap gains 2%: d = 1)
    p = plan_layers([BIG, TINY], 4, comm)
    big, tiny = p.layers
    assert big.degree > 1 and big.predicted_step_s < big.predicted_serial_s
    assert tiny.degree == 1                     # a few tokens: every chunk only adds latency
    steps = [plan_layers([BIG], 4, comm, degree=d).layers[0].predicted_step_s for d in range(1, 9)]
    assert plan_layers([BIG], 4, K).layers[0].degree == 1
    fastest = min(steps)                        # the smallest degree predicted within the tolerance
    want = min(d for d, s in zip(range(1, 9), steps) if s <= fastest * (1 + DEGREE_TOLERANCE) + 1e-12)
    assert big.degree == want and big.predicted_step_s == pytest.approx(steps[want - 1])


def test_override_and_json_round_trip(tmp_path):
    p = plan_layers([BIG, TINY], 4, K, degree=3)
    assert [lay.degree for lay in p.layers] == [3, 3] and all(lay.forced for lay in p.layers)
    q = OverlapPlan.from_json(p.write(tmp_path / "schedule.json").read_text())
    assert q == p
    assert json.loads(p.to_json())["format"] == "moecc.schedule/1"


def test_without_constants_the_degree_waits_for_start_up():
    p = plan_layers([BIG], 4, None)
    assert p.layers[0].degree == "auto" and p.layers[0].predicted_step_s is None
    assert p.degree("moe0") is None


@pytest.mark.parametrize("bad", [0, 9, 2.5])
def test_bad_degree_refused(bad):
    with pytest.raises(MoeccError, match="1..8"):
        plan_layers([BIG], 4, K, degree=bad)


def test_training_plan_chooses_the_backward_degree_with_the_degree(tmp_path):
    """training=True: each layer gets a backward degree dividing its degree, chosen with it for the
    fastest predicted forward + backward; forcing works, refusals name what to fix."""
    comm = {**K, "beta": 1e-7, "bwd_flops": 2.5e9, "bwd_chunk": 3e-4}
    p = plan_layers([BIG, TINY], 4, comm, training=True)
    for lay in p.layers:
        assert isinstance(lay.backward_degree, int) and lay.degree % lay.backward_degree == 0
        assert lay.predicted_backward_s <= lay.predicted_backward_serial_s
    big = p.layers[0]
    totals = {}
    for d in range(1, 9):
        for b in (b for b in range(1, d + 1) if d % b == 0):
            q = plan_layers([BIG], 4, comm, degree=d, training=True, backward_degree=b).layers[0]
            totals[d, b] = q.predicted_step_s + q.predicted_backward_s
    assert big.predicted_step_s + big.predicted_backward_s <= min(totals.values()) * (1 + DEGREE_TOLERANCE) + 1e-12
    assert OverlapPlan.from_json(p.write(tmp_path / "schedule.json").read_text()) == p
    inference = plan_layers([BIG], 4, comm).layers[0]
    assert inference.backward_degree is None and inference.predicted_backward_s is None
    assert plan_layers([BIG], 4, comm, degree=4, training=True, backward_degree=2).layers[0].backward_degree == 2
    assert plan_layers([BIG], 4, None, training=True).layers[0].backward_degree == "auto"
    with pytest.raises(MoeccError, match="must divide the overlap degree 4"):
        plan_layers([BIG], 4, comm, degree=4, training=True, backward_degree=3)
    with pytest.raises(MoeccError, match="needs training"):
        plan_layers([BIG], 4, comm, backward_degree=2)


def test_apply_sets_the_degree_by_layer_name():
    class Placement:
        name = "moe0"
    mod = torch.nn.Sequential(torch.nn.Linear(2, 2))
    mod[0].placement = Placement()
    assert apply(mod, plan_layers([BIG], 4, K, degree=5)) == 1
    assert mod[0].overlap_degree == 5 and mod[0].overlap_backward_degree is None
    assert apply(mod, plan_layers([BIG], 4, K, degree=4, training=True, backward_degree=2)) == 1
    assert (mod[0].overlap_degree, mod[0].overlap_backward_degree) == (4, 2)


class _Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.spec = MoESpec(num_experts=4, hidden=8, ffn=16, activation="gelu", router=RouterSpec(top_k=2),
                            name="blk0")
        self.w_in = torch.nn.Parameter(torch.randn(4, 16, 8))
        self.w_out = torch.nn.Parameter(torch.randn(4, 8, 16))

    def forward(self, x, ids, w):
        from moecc.ops import call_experts
        return call_experts(x, ids, w, self.w_in, self.w_out, self.spec)


def test_pass_finds_experts_layers_and_records_the_plan():
    x, ids, w = torch.randn(12, 8), torch.randint(0, 4, (12, 2)), torch.rand(12, 2)
    gm = torch.export.export(_Experts(), (x, ids, w)).module()
    layers = experts_layers(gm)
    assert [(lay.name, lay.tokens, lay.experts, lay.top_k) for lay in layers] == [("blk0", 12, 4, 2)]
    res = make({"ep": 2, "overlap_degree": 2})(gm)
    sched = OverlapPlan.from_json(res.graph_module.meta["moecc.overlap"])
    assert sched.layers[0].tokens == 6 and sched.layers[0].degree == 2
    with pytest.raises(MoeccError, match="--ep"):
        make({"ep": 1})(gm)




def test_ep_module_runs_chunked_when_the_plan_says(one_rank_group):
    """expert_parallel.apply, then overlap.apply with d=3: the EP experts modules run the chunked
    layer; outputs and gradients equal the unchunked EP model within the float32 bar (1e-6 rel)."""
    import ep_toy

    from moecc.distributed.comm import use_transport
    from moecc.distributed.transport import DelayedTransport
    from moecc.frontend import capture
    from moecc.passes.expert_parallel import apply as ep_apply, plan as ep_plan
    from moecc.passes.overlap import LayerSchedule
    model, inputs = ep_toy.build()
    gms = [ep_apply(capture(model, inputs, recognize=False).gm, ep_plan(
        capture(model, inputs, recognize=False).gm, {"ep": 1})) for _ in range(2)]
    names = [m.placement.name for m in gms[1].modules() if hasattr(m, "placement")]
    sched = OverlapPlan(1, tuple(LayerSchedule(n, 1, 3, True) for n in names))
    assert apply(gms[1], sched) == len(names) == 2
    calls = []
    tr = DelayedTransport(0.0, 0.0)                  # counts the collectives each model issues
    use_transport(tr)
    try:
        ys = []
        for gm in gms:
            before = tr.calls
            ys.append(gm(*inputs))
            calls.append(tr.calls - before)
    finally:
        use_transport(None)
        tr.close()
    # per layer: token numbers + split sizes + 1 dispatch + 1 combine; chunked: 1 sizes, 2 per chunk
    assert calls == [2 * (1 + 1 + 2), 2 * (1 + 1 + 3 * 2)]
    bar = 1e-6 * float(ys[0].detach().abs().max())
    assert float((ys[1] - ys[0]).abs().max()) <= bar
    for y in ys:
        y.square().sum().backward()
    for (n0, p0), (n1, p1) in zip(gms[0].named_parameters(), gms[1].named_parameters()):
        assert n0 == n1 and p0.grad is not None
        err = float((p1.grad - p0.grad).abs().max())
        assert err <= 1e-5 * max(1.0, float(p0.grad.abs().max())), (n0, err)


def test_ep_module_trains_at_the_planned_backward_degree(one_rank_group):
    """A plan for training (degree 4, backward degree 2) set on the EP modules: the backward sends
    each layer's gradients in 2 exchanges per direction (not 4), and the gradients are the same bits
    as at backward degree 4."""
    import ep_toy

    from moecc.distributed.comm import use_transport
    from moecc.distributed.transport import DelayedTransport
    from moecc.frontend import capture
    from moecc.passes.expert_parallel import apply as ep_apply, plan as ep_plan
    from moecc.passes.overlap import LayerSchedule
    model, inputs = ep_toy.build()
    grads, counts = [], []
    for bd in (2, 4):
        gm = capture(model, inputs, recognize=False).gm
        gm = ep_apply(gm, ep_plan(gm, {"ep": 1}))
        names = [m.placement.name for m in gm.modules() if hasattr(m, "placement")]
        assert apply(gm, OverlapPlan(1, tuple(LayerSchedule(n, 1, 4, True, backward_degree=bd) for n in names))) == 2
        tr = DelayedTransport(0.0, 0.0)
        use_transport(tr)
        try:
            y = gm(*inputs)
            before = tr.calls
            y.square().sum().backward()
            counts.append(tr.calls - before)
        finally:
            use_transport(None)
            tr.close()
        grads.append([p.grad for p in gm.parameters() if p.grad is not None])
    assert counts == [2 * 2 * 2, 2 * 2 * 4]              # layers x directions x backward degree
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_launch_with_overlap_writes_the_schedule(tmp_path):
    """compile --ep 2 --overlap-degree 3 (schedule.json in the artifact), torchrun 2 ranks: the same
    outputs as one process (within 1e-5: dense layers on half batches, chunked GEMMs), and the
    launch's schedule with each layer's degree and predicted times from constants measured at
    start-up."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ep_toy
    import numpy as np

    import moecc
    from moecc.distributed.comm import free_port
    model, inputs = ep_toy.build()
    opts = {"ep": 2, "overlap_degree": 3}
    art = moecc.compile(model, inputs, passes=[("expert_parallel", opts), ("overlap", opts)],
                        backend="torch", out=tmp_path / "art", progress=False)
    assert OverlapPlan.from_json((art / "schedule.json").read_text()).layers[0].degree == 3
    x = np.random.default_rng(0).integers(0, 64, (6, 8))
    np.savez(tmp_path / "in.npz", x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "moecc.distributed.launch", str(art),
           "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"), "--timeout", "30",
           "--schedule", str(tmp_path / "schedule.json")]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=180, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        want = moecc.load(art).module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["arr_0"], want, rtol=1e-5, atol=1e-5)
    sched = OverlapPlan.from_json((tmp_path / "schedule.json").read_text())
    assert [lay.degree for lay in sched.layers] == [3, 3] and sched.world == 2
    assert all(lay.predicted_step_s > 0 and lay.tokens == 24 for lay in sched.layers)
    assert sched.constants["flops"] > 0


def test_cli_overlap_degree_needs_ep(tmp_path, capsys, monkeypatch):
    from moecc.cli import main
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["compile", "samples/ep_toy.py:build", "--overlap-degree", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--overlap-degree needs --ep" in capsys.readouterr().err


def test_apply_splits_each_layer_around_its_shared_expert(one_rank_group):
    """expert_parallel.apply turns each experts node into h = EPExperts(x, ids, weights) (dispatches
    in flight) and y = ep_finish(h) right before y's first use: the shared expert's ops (independent
    of the exchanged tokens) lie between the two, so they run while the first dispatch is in flight;
    the split model equals the unsplit reference (one rank: d = 1 is the reference bit for bit)."""
    import ep_toy

    from moecc.distributed.module import ep_finish
    from moecc.frontend import capture
    from moecc.passes.expert_parallel import apply as ep_apply, plan as ep_plan
    model, inputs = ep_toy.build()
    ref = capture(model, inputs, recognize=False).gm(*inputs)
    gm = capture(model, inputs, recognize=False).gm
    gm = ep_apply(gm, ep_plan(gm, {"ep": 1}))
    nodes = list(gm.graph.nodes)
    issued = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target.startswith("moecc_ep_")]
    assert len(issued) == 2
    for i in issued:
        fin = next(j for j, n in enumerate(nodes) if n.target is ep_finish and n.args[0] is nodes[i])
        between = {str(a.target) for n in nodes[i + 1:fin] for a in n.all_input_nodes if a.op == "get_attr"}
        assert any(t.endswith(".s_in") for t in between) and any(t.endswith(".s_out") for t in between), between
        assert gm.get_submodule(nodes[i].target).split
    torch.testing.assert_close(gm(*inputs), ref, rtol=0, atol=0)
