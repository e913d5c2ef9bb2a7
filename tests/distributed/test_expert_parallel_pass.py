"""The expert_parallel pass: plan (structural and negative), apply on a real one-rank gloo group
(bit-identical to the unsplit graph), and a real 2-process torchrun launch of a compiled artifact."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moecc
import moecc.spec
from moecc.distributed.comm import free_port
from moecc.errors import MoeccError
from moecc.frontend import capture
from moecc.passes.expert_parallel import EPPlan, apply, experts_nodes, plan
from moecc.passes.placement import Plan, Topology, save_plan
from moecc.spec import RouterSpec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "samples"))
import ep_toy  # noqa: E402


def _captured(**kw):
    model, inputs = ep_toy.build(**kw)
    return capture(model, inputs, recognize=False), inputs


def _replicated_plan(world=2, E=8, names=("blocks.0.moe", "blocks.1.moe")) -> Plan:
    share = np.zeros((len(names), E, world))
    share[:, np.arange(E), np.arange(E) * world // E] = 1.0
    share[:, 0] = 0.0
    share[:, 0, [0, 1]] = [0.25, 0.75]                  # expert 0 on both ranks
    return Plan("hand", Topology(1, world, slots=E), share, tuple(names))


def test_plan_contiguous_and_json_round_trip():
    c, _ = _captured()
    p = plan(c.gm, {"ep": 2})
    assert [l.name for l in p.layers] == ["blocks.0.moe", "blocks.1.moe"]
    assert p.held(0) == [[0, 1, 2, 3]] * 2 and p.held(1) == [[4, 5, 6, 7]] * 2
    assert EPPlan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_plan_from_placement(tmp_path):
    c, _ = _captured()
    save_plan(_replicated_plan(), tmp_path / "placement.json")
    p = plan(c.gm, {"ep": 2, "placement": tmp_path / "placement.json"})
    assert p.method == "hand"
    assert p.held(0)[0] == [0, 1, 2, 3] and p.held(1)[0] == [0, 4, 5, 6, 7]


@pytest.mark.parametrize("cfg, words", [
    ({"ep": 3, "placement": "P"}, "3"),                          # devices != ranks
    ({"ep": 2, "placement": "P3"}, "another model"),             # three layers
    ({"ep": 2, "placement": "P4"}, "another model"),             # E = 4
    ({"ep": 2, "placement": "PN"}, "another model"),             # other layer names
    ({"ep": 16}, "16 ranks"),                                    # E < W without replicas
    ({"ep": 0}, "ep must be"),
])
def test_plan_refuses(tmp_path, cfg, words):
    c, _ = _captured()
    plans = {"P": _replicated_plan(), "P3": _replicated_plan(names=("a", "b", "c")),
             "P4": _replicated_plan(E=4), "PN": _replicated_plan(names=("x.moe", "y.moe"))}
    if "placement" in cfg:
        save_plan(plans[cfg["placement"]], tmp_path / "p.json")
        cfg = dict(cfg, placement=tmp_path / "p.json")
    with pytest.raises(MoeccError, match=words):
        plan(c.gm, cfg)


def test_capacity_scope():
    c, _ = _captured(router=RouterSpec(top_k=2, capacity_factor=1.0))
    assert {l.scope for l in plan(c.gm, {"ep": 2}).layers} == {"rank"}
    with pytest.raises(MoeccError, match="global.*cannot be honoured"):
        plan(c.gm, {"ep": 2, "capacity_scope": "global"})


class _MoeNode(torch.nn.Module):
    """One moecc::moe node (routing inside): planned like an experts node (decomposed at lowering)."""

    def __init__(self):
        super().__init__()
        self.spec = moecc.spec.MoESpec(num_experts=4, hidden=8, ffn=6, activation="gelu", name="m")
        self.router = torch.nn.Linear(8, 4)
        self.w_in = torch.nn.Parameter(torch.randn(4, 6, 8))
        self.w_out = torch.nn.Parameter(torch.randn(4, 8, 6))

    def forward(self, x):
        return moecc.ops.call_moe(x, self.router(x), self.w_in, self.w_out, self.spec)


def test_plans_moe_nodes():
    c = capture(_MoeNode(), (torch.randn(2, 3, 8),), recognize=False)
    p = plan(c.gm, {"ep": 2})
    assert [l.name for l in p.layers] == ["m"] and p.held(1) == [[2, 3]]


def test_refuses_a_graph_without_moe_layers():
    c = capture(torch.nn.Linear(8, 8), (torch.randn(2, 8),), recognize=False)
    with pytest.raises(MoeccError, match="no MoE layer to split"):
        plan(c.gm, {"ep": 2})



def test_apply_on_one_rank_is_the_unsplit_graph(one_rank_group):
    c, inputs = _captured()
    before = c.gm(*inputs)
    gm = apply(c.gm, plan(c.gm, {"ep": 1}))
    assert experts_nodes(gm) == []
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("moecc_ep_")]
    assert len(calls) == 2
    assert not hasattr(gm.get_submodule("blocks.0"), "w_in")             # the full weights left
    assert gm.moecc_ep_0.w_in.shape == (8, 24, 16)
    assert torch.equal(gm(*inputs), before)
    y = gm(*inputs)
    y.sum().backward()                                                   # trainable, local weights
    assert gm.moecc_ep_1.w_out.grad is not None and gm.moecc_ep_1.w_out.grad.abs().sum() > 0


def _torchrun(art, inp, out, n, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "moecc.distributed.launch", str(art), "--input", str(inp), "--output", str(out),
           "--timeout", "20"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_launch_two_processes(tmp_path):
    """Compile with --ep 2 and a replicated placement, torchrun 2 ranks; equal to one process
    (dense layers run on each rank's half of the batch: GEMMs of other shapes, so within 1e-5;
    the EP layer itself is bit-identical: test_ep_runtime)."""
    save_plan(_replicated_plan(), tmp_path / "placement.json")
    model, inputs = ep_toy.build()
    art = moecc.compile(model, inputs, passes=[("expert_parallel", {"ep": 2, "placement":
                                                                    tmp_path / "placement.json"})],
                        backend="torch", out=tmp_path / "art", progress=False)
    assert json.loads((art / "manifest.json").read_text())["expert_parallel"]["world"] == 2
    x = np.random.default_rng(0).integers(0, 64, (5, 8))
    np.savez(tmp_path / "in.npz", x)
    r = _torchrun(art, tmp_path / "in.npz", tmp_path / "out.npz", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")["arr_0"]
    with torch.no_grad():
        want = moecc.load(art).module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_launch_wrong_world_size(tmp_path):
    """torchrun with 3 ranks for a 2-rank artifact: every rank refuses with one line."""
    model, inputs = ep_toy.build()
    art = moecc.compile(model, inputs, passes=[("expert_parallel", {"ep": 2})], backend="torch",
                        out=tmp_path / "art", progress=False)
    np.savez(tmp_path / "in.npz", np.random.default_rng(0).integers(0, 64, (5, 8)))
    bad = _torchrun(art, tmp_path / "in.npz", tmp_path / "bad.npz", 3)
    said = re.findall(r"moecc launch: error: rank (\d): launch: the artifact is planned for 2 ranks, "
                      r"torchrun started 3", bad.stderr)      # ranks' lines may interleave
    assert bad.returncode != 0 and sorted(said) == ["0", "1", "2"], bad.stderr[-2000:]


def test_cli_refuses(tmp_path):
    from moecc.cli import main
    assert main(["compile", "samples/ep_toy.py:build", "--placement", "p.json",
                 "--out", str(tmp_path / "a")]) != 0
    assert main(["compile", "samples/ep_toy.py:build", "--ep", "2", "--to", "onnx",
                 "--out", str(tmp_path / "b")]) != 0
