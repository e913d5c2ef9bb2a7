"""The ONNX artifact outside moecc: a process with onnxruntime + numpy only reproduces the eager model
at a new token count; the runtime's contract (input casting, errors) and `lower`'s notes and options."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moecc.backends.onnx import runtime
from moecc.errors import MoeccError
from numerics import assert_numerically_equal
from onnx_cases import Side, eager, inputs, lower, spec

RUNTIME = Path(runtime.__file__)
SPECS = [spec("fused", top_k=2), spec("hash", kind="hash", top_k=2, act="gelu"),
         spec("sigmoid_capacity", E=8, kind="sigmoid_topk", n_groups=2, capacity_factor=0.5, act="swiglu")]

STANDALONE = """
import importlib.util, sys
import numpy as np
sys.modules["moecc"] = None                      # as if moecc were not installed
spec = importlib.util.spec_from_file_location("moecc_onnx_runtime", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
data = np.load(sys.argv[2])
outs = rt.run_onnx(sys.argv[3], [data["x"], data["ids"]], threads=1)
np.savez(sys.argv[4], *outs)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("imported:", "onnxruntime" in sys.modules, "moecc" in sys.modules and sys.modules["moecc"] is not None)
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = Side(SPECS)
    low, path = lower(model, inputs(2, 3), tmp_path_factory.mktemp("art"), onnx_moe="auto")
    return model, low, path


def test_a_process_with_only_onnxruntime_and_numpy_reproduces_the_model(artifact, tmp_path):
    model, low, path = artifact
    assert "ort.moe_fused" in low.kernels[0].kernel                 # alone, or its token bucket in a dispatch
    x, ids = inputs(3, 11, seed=5)
    np.savez(tmp_path / "in.npz", x=x.numpy(), ids=ids.numpy().astype(np.int32))   # int32 ids: cast by the runtime
    done = subprocess.run([sys.executable, "-c", STANDALONE, str(RUNTIME), str(tmp_path / "in.npz"), str(path),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: True False" in done.stdout
    got = np.load(tmp_path / "out.npz")
    expected = eager(model, (x, ids))
    assert_numerically_equal([got[f"arr_{i}"] for i in range(len(SPECS))], expected, atol=1e-5, what="standalone")


def test_importing_the_runtime_through_moecc_does_not_import_torch():
    code = "import sys, moecc.backends.onnx.runtime; assert 'torch' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_load_finds_the_model_and_checks_inputs(artifact, tmp_path):
    model, low, path = artifact
    manifest = {"backend": {"name": "onnx", **low.to_dict()}}
    run = runtime.load(path.parent, manifest, threads=1)
    x, ids = inputs(1, 4, seed=9)
    assert_numerically_equal(run([x.numpy(), ids.numpy()]), eager(model, (x, ids)), atol=1e-5, what="load")
    with pytest.raises(MoeccError, match=r"takes 2 inputs \(x, token_ids\), got 1"):
        run([x.numpy()])
    with pytest.raises(MoeccError, match="no model.onnx"):
        runtime.load(tmp_path, {})


def test_notes_name_the_opset_and_dynamic_inputs(artifact):
    _, low, path = artifact
    assert low.files == ["model.onnx"] and path.exists()
    assert low.notes["opset"] >= 18 and low.notes["onnx_moe"] == "auto" and not low.notes["external_data"]
    x, ids = low.notes["inputs"]
    assert (x["name"], ids["name"]) == ("x", "token_ids")
    assert isinstance(x["shape"][0], str) and isinstance(x["shape"][1], str) and x["shape"][2] == 8
    assert len(low.notes["outputs"]) == len(SPECS)
    json.dumps(low.to_dict())                       # goes into manifest.json as is


def test_bad_options_are_one_clear_line(tmp_path):
    m = Side(SPECS[:1])
    with pytest.raises(MoeccError, match="unknown --onnx-moe 'fastest'"):
        lower(m, inputs(2, 3), tmp_path / "a", onnx_moe="fastest")
    with pytest.raises(MoeccError, match="unknown ONNX kernel 'torch.grouped_gemm'"):
        lower(m, inputs(2, 3), tmp_path / "b", kernel="torch.grouped_gemm")
    with pytest.raises(MoeccError, match="MoE layer fused: kernel ort.moe_fused cannot run it"):
        lower(Side([spec("fused", act="gelu")]), inputs(2, 3), tmp_path / "c", onnx_kernel="ort.moe_fused")
