"""Training through expert parallel from the Python API on a captured model: tiny_gpt upcycled to 4
experts (perturbed: routing matters), the expert_parallel pass, `parallelize` on 2 torchrun ranks,
forward + backward; every parameter's gradient (local experts gathered by the plan, replicated ones
summed over ranks as data parallel does) equals the single-process gradient on the whole batch within
1e-5 relative (the dense layers run on half the batch per rank: GEMMs of other shapes). See
train_worker.py for the loss and the bookkeeping."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecc.distributed.comm import free_port

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("overlap", [False, True], ids=["unchunked", "overlap-4-backward-2"])
def test_gradients_equal_one_process(tmp_path, overlap):
    """overlap: the schedule planned for training (schedule.configure(training=True), degree 4,
    backward degree 2): the chunked layers and the pipelined backward, same bar."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(HERE / "train_worker.py"), str(tmp_path / "grads.json"), *(["overlap"] if overlap else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=HERE.parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "grads.json").read_text())
    missing = [n for n, v in report.items() if v.get("missing")]
    assert not missing, missing
    assert sum(v["expert"] for v in report.values()) == 8              # 4 layers × (w_in, w_out)
    bad = {n: v for n, v in report.items() if not (v["abs"] <= 1e-5 * max(1.0, v["scale"]))}
    assert not bad, bad
    if overlap:
        layers = json.loads((tmp_path / "grads.schedule.json").read_text())["layers"]
        assert len(layers) == 4 and all(lay["degree"] == 4 and lay["backward_degree"] == 2 for lay in layers)
        assert all(lay["predicted_backward_s"] > 0 for lay in layers)
