"""The Python API: moecc.capture / transform / compile / load, and the light `import moecc`."""
import json
import subprocess
import sys

import torch

import moecc
import tiny_gpt
from moecc.pipeline import moe_nodes
from numerics import assert_numerically_equal


def test_import_moecc_does_not_import_torch():
    code = "import sys, moecc, moecc.cli, moecc.run_artifact; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_capture_transform_compile_load(tmp_path):
    model, ex = tiny_gpt.build()
    captured = moecc.capture(model, ex)
    pm = moecc.transform(captured, [("upcycle", {"num_experts": 4, "top_k": 1, "layers": "0,2"})])
    assert [r.name for r in pm.records] == ["canonicalize", "upcycle"]
    assert len(list(moe_nodes(captured.gm))) == 2
    out = moecc.compile(model, ex, passes=[("upcycle", {"num_experts": 4, "top_k": 1})], backend="torch",
                        out=tmp_path / "a", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["ok"]
    program = moecc.load(out)
    tokens = torch.randint(0, 256, (1, 9))
    assert_numerically_equal(program.module()(tokens), model(tokens), atol=1e-5)
