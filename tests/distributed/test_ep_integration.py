"""Expert parallel on every model moecc compiles, end to end with real 2-rank torchrun launches:
an upcycled model (moecc::moe nodes, decomposed by the torch backend, planned by position), with
perturbed experts so routing matters, at overlap degree 2; a transformers family captured through the
ExpertsInterface (moecc::experts nodes behind HF's own router, its shared expert as ordinary ops).
Each launch is compared with the single-process artifact on the whole batch (1e-5: the dense layers run
on each rank's half of the batch, GEMMs of other shapes; the EP layer itself is bit-identical, see
test_ep_runtime)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

import moecc
from moecc.distributed.comm import free_port
from moecc.errors import MoeccError
from moecc.frontend import capture
from moecc.passes.expert_parallel import experts_nodes, layer_nodes, plan

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "samples"))
import tiny_gpt  # noqa: E402
from perturbed_models import upcycled  # noqa: E402


def _torchrun(art, inp, out, n=2, *extra, timeout=180):
    import os
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "moecc.distributed.launch", str(art), "--input", str(inp), "--output", str(out),
           "--timeout", "30", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _launch_matches(art: Path, x: np.ndarray, tmp: Path, *extra) -> float:
    np.savez(tmp / "in.npz", x)
    r = _torchrun(art, tmp / "in.npz", tmp / "out.npz", 2, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp / "out.npz")["arr_0"]
    with torch.no_grad():
        want = tree_leaves(moecc.load(art).module()(torch.from_numpy(x)))[0].numpy()
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(want).max())), err
    return err


def test_plan_covers_moe_nodes_and_apply_needs_the_decomposed_program():
    gm, inputs = upcycled(tiny_gpt.build, experts=4)
    c = capture(gm, inputs, recognize=False)
    assert len(layer_nodes(c.gm)) == 4 and experts_nodes(c.gm) == []
    p = plan(c.gm, {"ep": 2})
    assert [l.name for l in p.layers] == [f"blocks.{i}.ffn" for i in range(4)]
    assert p.held(1) == [[2, 3]] * 4
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        from moecc.passes.expert_parallel import EPPlan, apply, decomposed
        with pytest.raises(MoeccError, match="still has torch.ops.moecc.moe nodes"):
            apply(c.gm, plan(c.gm, {"ep": 1}))
        one = plan(c.gm, {"ep": 1})
        bad = EPPlan(1, "x", tuple(l.__class__(**{**l.__dict__, "name": "other"}) for l in one.layers))
        with pytest.raises(MoeccError, match="another model"):
            apply(decomposed(c), bad)
        want = c.gm(*inputs)
        ep = apply(decomposed(c), one)
        assert experts_nodes(ep) == [] and len([m for m in ep.modules() if hasattr(m, "placement")]) == 4
        torch.testing.assert_close(ep(*inputs), want, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_upcycled_gpt_two_ranks_overlap(tmp_path):
    """--upcycle + --ep 2 + --overlap-degree 2 (the moe-node path), perturbed experts."""
    gm, inputs = upcycled(tiny_gpt.build, experts=4, top_k=2, seed=3)
    art = moecc.compile(gm, inputs, passes=[("expert_parallel", {"ep": 2}),
                                            ("overlap", {"ep": 2, "overlap_degree": 2})],
                        backend="torch", out=tmp_path / "art", progress=False)
    sched = json.loads((art / "schedule.json").read_text())
    assert [lay["degree"] for lay in sched["layers"]] == [2] * 4
    x = np.random.default_rng(0).integers(0, 256, (6, 8))
    _launch_matches(art, x, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["interface", "recognized"])
def test_hf_family_two_ranks(tmp_path, path):
    """Qwen2-MoE (softmax top-4, sigmoid-gated shared expert): with no recognizer through the
    ExpertsInterface (experts nodes, HF's shared expert as ops), or recognized (one moe node with the
    shared expert inside, decomposed by the backend)."""
    import hf_moe

    from moecc.recognize.base import Registry
    model, inputs = hf_moe.build_qwen2_moe()
    c = capture(model, inputs, recognizers=Registry() if path == "interface" else None)
    assert len(experts_nodes(c.gm)) == (2 if path == "interface" else 0) and len(layer_nodes(c.gm)) == 2
    art = moecc.compile(c.gm, inputs, passes=[("expert_parallel", {"ep": 2})], backend="torch",
                        out=tmp_path / "art", progress=False)
    x = np.random.default_rng(1).integers(0, 128, (4, 8))
    _launch_matches(art, x, tmp_path)
