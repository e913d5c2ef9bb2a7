"""The TVM artifact outside the compiler: a process with tvm + numpy only (torch never imported) runs it
at a new token count; corrupted artifacts and wrong inputs fail with one clear line."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from moecc.backends.tvm import lower, runtime
from moecc.errors import MoeccError
from moecc.nn import MoE
from numerics import assert_numerically_equal
from tvm_cases import spec

H = 16
STANDALONE = """
import sys
import numpy as np
from moecc.backends.tvm import runtime
data = np.load(sys.argv[2])
outs = runtime.load(sys.argv[1], {})([data["x"], data["ids"].astype(np.int32)])
assert "torch" not in sys.modules, "the TVM runtime imported torch"
assert "tvm" in sys.modules
np.savez(sys.argv[3], *outs)
"""


class Hashed(nn.Module):
    """x [B, S, H], token ids [B, S] -> y: hash-routed experts (the ids reach the op) plus a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.moe = MoE(spec("hashed", kind="hash", top_k=2, act="gelu"), init_std=H ** -0.5)
        self.lin = nn.Linear(H, H)
        self.eval()

    def forward(self, x, ids):
        return self.lin(x) + self.moe(x, token_ids=ids)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = Hashed()
    args = (torch.randn(2, 6, H), torch.randint(0, 1000, (2, 6)))
    dims = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in args)
    out = tmp_path_factory.mktemp("tvm_rt")
    lower.lower(torch.export.export(model, args, dynamic_shapes=dims), out, {"kernel": "tvm.gather"})
    return model, out


def test_runs_in_a_process_without_torch(artifact, tmp_path):
    model, out = artifact
    x, ids = torch.randn(3, 11, H), torch.randint(0, 30000, (3, 11))
    np.savez(tmp_path / "in.npz", x=x.numpy(), ids=ids.numpy())
    subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                   check=True)
    want = model(x, ids).detach().numpy()
    assert_numerically_equal(np.load(tmp_path / "o.npz")["arr_0"], want, atol=1e-5, what="standalone")


def test_wrong_inputs_say_what_was_expected(artifact):
    _, out = artifact
    run = runtime.load(out)
    x, ids = np.zeros((1, 2, H), np.float32), np.zeros((1, 2), np.int64)
    with pytest.raises(MoeccError, match="takes 2 inputs"):
        run([x])
    with pytest.raises(MoeccError, match=r"input x: expected shape \['s\d+', 's\d+', 16\], got \[1, 2, 5\]"):
        run([np.zeros((1, 2, 5), np.float32), ids])
    with pytest.raises(MoeccError, match="input x: expected float32, got int64"):
        run([x.astype(np.int64), ids])
    assert run([x.astype(np.float64), ids])[0].shape == (1, 2, H)          # float64 -> float32 is fine


def corrupt(src, tmp_path, name: str, damage):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.mark.parametrize("case,damage,message", [
    ("flipped_library", lambda d: (d / "model.so").write_bytes(b"\0" + (d / "model.so").read_bytes()[1:]),
     "model.so is corrupted"),
    ("no_params", lambda d: (d / "params.npz").unlink(), "params.npz is missing"),
    ("bad_meta", lambda d: (d / "tvm_meta.json").write_text("{not json"), "tvm_meta.json is corrupted"),
    ("no_meta", lambda d: (d / "tvm_meta.json").unlink(), "no tvm_meta.json"),
])
def test_corrupted_artifact(artifact, tmp_path, case, damage, message):
    with pytest.raises(MoeccError, match=message):
        runtime.load(corrupt(artifact[1], tmp_path, case, damage))


def test_library_that_does_not_load_is_named_even_with_matching_checksums(artifact, tmp_path):
    def rewrite(d):
        (d / "model.so").write_bytes(b"not a shared library")
        meta = json.loads((d / "tvm_meta.json").read_text())
        meta["sha256"]["model.so"] = runtime.sha256(d / "model.so")
        (d / "tvm_meta.json").write_text(json.dumps(meta))
    with pytest.raises(MoeccError, match="model.so does not load"):
        runtime.load(corrupt(artifact[1], tmp_path, "garbage", rewrite))


def test_import_tvm_keeps_torch_out_when_it_was_not_loaded():
    code = ("import sys\nfrom moecc.backends.tvm.runtime import import_tvm\ntvm = import_tvm()\n"
            "assert 'torch' not in sys.modules and tvm.runtime.enabled('llvm')\n"
            "import torch\nprint(torch.ones(1).item())")                  # torch still importable later
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "1.0"
