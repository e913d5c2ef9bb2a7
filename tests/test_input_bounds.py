"""Serving never reads out of bounds: compile records each input's bounds (token ids from the
embedding table, the sequence length from the position table, every dim >= 1) and every runtime
(torch, ONNX, TVM, the standalone ONNX runner) refuses inputs outside them in one line, exit 2,
before running. On TVM an id = vocab or an empty sequence segfaulted before this check."""
import json
import subprocess
import sys

import numpy as np
import pytest

import moecc
from moecc.cli import main
from moecc.errors import MoeccError

V, P = 256, 256                          # tiny_gpt's vocabulary and positions


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def test_bounds_read_off_the_graph():
    from tiny_gpt import build

    from moecc.frontend import capture
    from moecc.input_bounds import find
    model, inputs = build(vocab=100, max_len=50, layers=1)
    (spec,) = find(capture(model, inputs).gm, capture(model, inputs).inputs)
    assert spec["shape"] == ["batch", "seq"]
    assert spec["dims"]["batch"] == {"min": 1}
    assert spec["dims"]["seq"]["min"] == 1 and spec["dims"]["seq"]["max"] == 50
    assert spec["values"]["min"] == 0 and spec["values"]["max"] == 99


@pytest.fixture(scope="module", params=["torch", "onnx", "tvm"])
def artifact(request, tmp_path_factory):
    from tiny_gpt import build
    model, inputs = build(layers=1)
    out = tmp_path_factory.mktemp(request.param) / "art"
    moecc.compile(model, inputs, passes=[("upcycle", {"num_experts": 2, "top_k": 1})], backend=request.param,
                  out=out, verify=False, progress=False, source="samples/tiny_gpt.py:build")
    return out


def _tokens(shape, fill=1, at=None):
    t = np.full(shape, fill, np.int64)
    if at is not None:
        t.flat[min(3, t.size - 1)] = at
    return t


BAD = {
    "id 99999": (_tokens((2, 8), at=99999), f"value 99999 at [0, 3] is outside 0..{V - 1}"),
    "id = vocab": (_tokens((2, 8), at=V), f"value {V} at [0, 3] is outside 0..{V - 1}"),
    "negative id": (_tokens((2, 8), at=-1), f"value -1 at [0, 3] is outside 0..{V - 1}"),
    "length 0": (_tokens((2, 0)), "seq = 0 is outside 1..256"),
    "batch 0": (_tokens((0, 8)), "batch = 0 is outside >= 1"),
    "length > positions": (_tokens((1, P + 144)), f"seq = {P + 144} is outside 1..{P} (pos.weight has {P} positions)"),
    "rank 1": (_tokens((8,)), "expected int64 with 2 dims"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_moecc_run_refuses_out_of_bounds(artifact, case, tmp_path, capsys):
    tokens, msg = BAD[case]
    np.savez(tmp_path / "in.npz", tokens=tokens)
    assert main(["run", str(artifact), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error: input tokens") and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.npz").exists()


def test_edges_inside_the_bounds_run(artifact, tmp_path, capsys):
    """The largest id, the longest sequence and a single token are served (the bounds are not too tight)."""
    for tokens in (_tokens((1, P), fill=V - 1), _tokens((1, 1), fill=0)):
        np.savez(tmp_path / "in.npz", tokens=tokens)
        assert main(["run", str(artifact), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 0
        out = np.load(tmp_path / "o.npz")["arr_0"]
        assert out.shape == (*tokens.shape, V) and np.isfinite(out).all()


def test_manifest_names_dims_and_records_bounds(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    (spec,) = m["inputs"]
    assert spec["shape"] == ["batch", "seq"] and m["outputs"][0]["shape"] == ["batch", "seq", V]
    assert spec["dims"]["seq"]["max"] == P and spec["values"] == {"min": 0, "max": V - 1,
                                                                   "why": f"embed.weight has {V} rows"}


def test_loaded_runtime_refuses_too(artifact):
    """The Python API's runner checks as `moecc run` does (the runtime holds the check, not the CLI)."""
    from moecc import backends
    from moecc.artifact import read_manifest
    manifest = read_manifest(artifact)
    run = backends.runtime(manifest["backend"]["name"]).load(artifact, manifest)
    with pytest.raises(MoeccError, match="outside 0..255"):
        run([_tokens((1, 4), at=V)])
    assert run([_tokens((1, 4), fill=V - 1)])[0].shape == (1, 4, V)


def test_example_input_is_accepted(artifact, tmp_path, capsys):
    path = tmp_path / "tokens.npz"
    assert main(["run", str(artifact), "--example-input", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    tokens = np.load(path)["tokens"]
    assert tokens.shape == (2, 16) and tokens.dtype == np.int64 and 0 <= tokens.min() and tokens.max() < V
    assert main(["run", str(artifact), "--input", str(path)]) == 0


def test_standalone_onnx_runner_refuses_out_of_bounds(artifact):
    if json.loads((artifact / "manifest.json").read_text())["backend"]["name"] != "onnx":
        pytest.skip("the standalone runner runs ONNX artifacts")
    run = [sys.executable, "samples/run_onnx_standalone.py", str(artifact)]
    bad = subprocess.run(run + ["2", str(P + 1)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"run_onnx_standalone: error: input tokens: seq = {P + 1} is outside 1..{P} (pos.weight has {P} positions)")
    good = subprocess.run(run + ["2", str(P)], capture_output=True, text=True)
    assert good.returncode == 0 and "finite=True" in good.stdout, good.stderr
