"""Issue 6's done-criterion: `moecc compile samples/tiny_gpt.py:build --upcycle 8 --top-k 2 --to tvm` writes
an artifact that a process with only tvm + numpy runs, reproducing the dense model (upcycled at init ==
dense) at a token count other than the example's."""
import json
import subprocess
import sys

import numpy as np

import tiny_gpt
from moecc.cli import main

RUNNER = """
import sys
import numpy as np
from moecc.backends.tvm import runtime
data = np.load(sys.argv[2])
outs = runtime.load(sys.argv[1], {})([data[k] for k in data.files])
assert "torch" not in sys.modules
np.savez(sys.argv[3], *outs)
"""


def test_tiny_gpt_tvm_artifact_runs_without_torch(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "art"
    assert main(["compile", "samples/tiny_gpt.py:build", "--upcycle", "8", "--top-k", "2", "--to", "tvm",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["ok"] and len(manifest["backend"]["kernels"]) == 4
    assert {"model.so", "params.npz", "tvm_meta.json"} <= {p.name for p in out.iterdir()}
    model, (tokens,) = tiny_gpt.build()
    fresh = tokens.repeat(3, 1)[:, :-5]                                 # batch 6, seq 11
    np.savez(tmp_path / "in.npz", fresh.numpy())
    subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                   check=True)
    got = np.load(tmp_path / "o.npz")["arr_0"]
    want = model(fresh).detach().numpy()
    assert got.shape == want.shape == (6, 11, 256)
    assert np.abs(got - want).max() < 1e-4
