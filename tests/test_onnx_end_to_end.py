"""Issue 2's done-criterion: the compiled model.onnx runs in a process with only onnxruntime + numpy
and, at a token count other than the example's, reproduces the DENSE model (upcycled at init == dense)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_bert
import tiny_gpt
from moecc.cli import main

RUNNER = """
import sys, numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"])
data = np.load(sys.argv[2])
outs = sess.run(None, {i.name: data[f"arr_{k}"] for k, i in enumerate(sess.get_inputs())})
assert "torch" not in sys.modules and "moecc" not in sys.modules
np.savez(sys.argv[3], *outs)
"""


@pytest.mark.parametrize("name,build,mode", [("samples/tiny_gpt.py:build", tiny_gpt.build, "auto"),
                                             ("samples/tiny_bert.py:build", tiny_bert.build, "auto"),
                                             ("samples/tiny_gpt.py:build", tiny_gpt.build, "portable")])
def test_onnx_in_plain_onnxruntime_matches_dense(name, build, mode, root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "art"
    assert main(["compile", name, "--upcycle", "8", "--top-k", "2", "--to", "onnx", "--onnx-moe", mode,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kernels = {k["kernel"] for k in manifest["backend"]["kernels"]}
    if mode == "portable":
        assert not any(k.startswith("ort.") for k in kernels)
    if "bert" in name:                       # exact GELU is not the fused op's (tanh) GELU
        assert "ort.moe_fused" not in kernels
    model, ex = build()
    fresh = tuple(torch.cat([t, t, t], 0)[:, :-5] for t in ex)       # batch 6, seq -5
    np.savez(tmp_path / "in.npz", *[t.numpy() for t in fresh])
    subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                   check=True)
    got = np.load(tmp_path / "o.npz")["arr_0"]
    want = model(*fresh).detach().numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
