"""Issue 15 item 2: checks where routing matters. Every backend's artifact of an upcycled model whose
experts were perturbed (tests/perturbed_models.py) is compared with the captured PyTorch graph at a token
count other than the example's; and compile-time verification of a plain upcycled model (identical
experts, where any routing gives the same output) still catches a kernel that mixes experts up."""
import json

import numpy as np
import pytest
import torch

import perturbed_models
from moecc import backends
from moecc.cli import main
from moecc.perturb import perturb_experts, routing_blind

GPT = "samples/tiny_gpt.py:build"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def _run(out, inputs):
    manifest = json.loads((out / "manifest.json").read_text())
    return backends.runtime(manifest["backend"]["name"]).load(out, manifest)([t.numpy() for t in inputs])


@pytest.mark.parametrize("flags", [["--to", "torch"], ["--to", "onnx"], ["--to", "onnx", "--onnx-moe", "portable"],
                                   ["--to", "tvm"]], ids=["torch", "onnx-auto", "onnx-portable", "tvm"])
def test_backend_matches_captured_graph_where_routing_matters(flags, tmp_path):
    model, (tokens,) = perturbed_models.gpt()
    assert not routing_blind(model)
    out = tmp_path / "art"
    assert main(["compile", "tests/perturbed_models.py:gpt", *flags, "--out", str(out)]) == 0
    labels = [c["label"] for c in json.loads((out / "manifest.json").read_text())["verification"]["checks"]]
    assert labels == ["example", "fresh"]                    # experts already differ: no twin needed
    fresh = tokens.repeat(3, 1)[:, :-5]                      # batch 6, seq 11
    (got,) = _run(out, [fresh])
    with torch.no_grad():
        want = model(fresh).numpy()
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, err
    with torch.no_grad():                                    # and routing does matter in this model
        other = perturb_experts(model, seed=1)(fresh).numpy()
    assert np.abs(other - want).max() > 1e-2


def _reversed_experts(fn):
    def mutated(x, logits, w_in, w_out, b_in, b_out, *rest, **kw):
        flip = lambda t: None if t is None else t.flip(0)   # noqa: E731
        return fn(x, logits, flip(w_in), flip(w_out), flip(b_in), flip(b_out), *rest, **kw)
    return mutated


def test_verification_of_upcycled_model_catches_experts_in_another_order(tmp_path, capsys, monkeypatch):
    import dataclasses

    from moecc.backends.torch import kernels
    loop = kernels.KERNELS["torch.loop"]
    monkeypatch.setitem(kernels.KERNELS, "torch.loop", dataclasses.replace(loop, fn=_reversed_experts(loop.fn)))
    out = tmp_path / "art"
    args = ["compile", GPT, "--upcycle", "4", "--top-k", "2", "--kernel", "torch.loop", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "differs from the PyTorch reference" in err and "perturbed" in err and not out.exists()
