"""Run-time kernel choice by token count in TVM artifacts (backends/tvm/dispatch.py): one library per token
bucket (backends/buckets.py, the ONNX If's buckets), the manifest naming each bucket's kernel, the runtime
running the library of the call's bucket, every bucket numerically the PyTorch reference."""
import json

import numpy as np
import pytest
import torch

from moecc import api
from moecc.backends import buckets
from moecc.backends.tvm import dispatch, runtime
from moecc.nn import MoE
from tvm_cases import spec

H = 64
GEMM_IN = {"tvm.gather": "moe_gather_in", "tvm.grouped_gemm": "moe_segment_in", "tvm.dense_masked": "moe_dense_in"}


def check_dispatch(artifact, model, tokens=(1, 15, 16, 40)) -> None:
    """For each T: the library the runtime picks holds the experts GEMM of the kernel the manifest names
    for T, and its output is the reference's."""
    import tvm
    manifest = json.loads((artifact / "manifest.json").read_text())
    (layer,) = manifest["backend"]["kernels"]
    plan = buckets.decode(dispatch.BY_TOKENS, layer["kernel"])
    run = runtime.load(artifact)
    for T in tokens:
        want_kernel = buckets.pick(plan, T)
        lib = tvm.runtime.load_module(str(artifact / run.library_for(T)))
        held = {k for k, f in GEMM_IN.items() if lib.implements_function(f, True)}
        assert held == {want_kernel}, f"T={T}: {run.library_for(T)} holds {held}, manifest says {want_kernel}"
        x = np.random.default_rng(T).standard_normal((1, T, H)).astype(np.float32)
        with torch.inference_mode():
            want = model(torch.from_numpy(x))
        torch.testing.assert_close(torch.from_numpy(run([x])[0]), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(2)
    model = MoE(spec("moe", E=4, H=H, F=128, act="swiglu", top_k=2), init_std=H ** -0.5).eval()
    out = tmp_path_factory.mktemp("dispatch") / "art"
    api.compile(model, (torch.randn(1, 6, H),), backend="tvm", out=out, progress=False, verify=False)
    return model, out                                  # (check_dispatch compares every bucket to the model)


def test_manifest_names_each_buckets_kernel(compiled):
    _, out = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    (layer,) = manifest["backend"]["kernels"]
    assert layer["kernel"] == "tvm.by_tokens:tvm.gather@16:tvm.grouped_gemm"
    assert "tvm.gather for 1 ≤ T < 16" in layer["reason"]
    meta = json.loads((out / runtime.META).read_text())
    libs = meta["dispatch"]["libraries"]
    assert [(e["below"], e["kernels"]) for e in libs] == [(16, {"moe": "tvm.gather"}), (None, {"moe": "tvm.grouped_gemm"})]
    assert meta["dispatch"]["tokens"] == [[0, 1]]                      # x [1, T, H]: T is input 0's dim 1
    for e in libs:                                                     # hashed like every artifact file
        assert manifest["files"][e["library"]] == runtime.sha256(out / e["library"])


def test_runtime_runs_the_buckets_library(compiled):
    check_dispatch(compiled[1], compiled[0])


def test_a_wrong_bucket_mapping_is_caught(compiled, tmp_path):
    """The libraries swapped between the buckets (outputs stay right: both kernels are exact)."""
    import shutil
    model, out = compiled
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    meta = json.loads((bad / runtime.META).read_text())
    libs = meta["dispatch"]["libraries"]
    libs[0]["library"], libs[1]["library"] = libs[1]["library"], libs[0]["library"]
    (bad / runtime.META).write_text(json.dumps(meta))
    with pytest.raises(AssertionError, match="holds"):
        check_dispatch(bad, model)


def test_no_dispatch_when_one_kernel_is_asked_for(tmp_path):
    torch.manual_seed(2)
    model = MoE(spec("moe", E=4, H=H, F=128, act="swiglu", top_k=2), init_std=H ** -0.5).eval()
    out = tmp_path / "art"
    api.compile(model, (torch.randn(1, 6, H),), backend="tvm", out=out, options={"tokens": 64}, progress=False,
                verify=False)
    meta = json.loads((out / runtime.META).read_text())
    assert "dispatch" not in meta and not (out / "model.below16.so").exists()
    assert json.loads((out / "manifest.json").read_text())["backend"]["kernels"][0]["kernel"] == "tvm.grouped_gemm"
