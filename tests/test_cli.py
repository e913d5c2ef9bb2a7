"""`moecc compile / inspect / run` end to end, and one clear line + non-zero exit for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moecc.cli import main

GPT = "samples/tiny_gpt.py:build"
BERT = "samples/tiny_bert.py:build"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


@pytest.mark.parametrize("model", [GPT, BERT])
def test_compile_torch_and_reload(model, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", model, "--upcycle", "4", "--top-k", "2", "--to", "torch", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["ok"] and [c["label"] for c in m["verification"]["checks"]] == ["example", "fresh", "perturbed"]
    assert m["verification"]["checks"][0]["shapes"] != m["verification"]["checks"][1]["shapes"]
    assert m["passes"][-1]["name"] == "upcycle" and m["passes"][-1]["stats"]["ffn_rewritten"] >= 3
    assert all(layer["num_experts"] == 4 for layer in m["layers"])
    assert any(isinstance(d, str) for d in m["inputs"][0]["shape"]), "token dims must be dynamic"
    assert (out / "report.md").read_text().startswith("# moecc artifact")
    # reload in a fresh process with torch.export.load and compare to the dense model at another T
    code = f"""
import sys, torch; sys.path.insert(0, 'samples')
import moecc.ops
from {model.split('/')[1].split('.')[0]} import build
model, ex = build()
ep = torch.export.load('{out}/model.pt2')
fresh = tuple(torch.cat([t, t], 0)[:, :-2] for t in ex)
print(float((ep.module()(*fresh) - model(*fresh)).abs().max()))
"""
    err = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert err < 1e-4
    assert "moe (softmax_topk)" in capsys.readouterr().out


def test_inspect_model_and_artifact(tmp_path, capsys):
    assert main(["inspect", GPT]) == 0
    text = capsys.readouterr().out
    assert text.count("ffn (swiglu)") == 4 and "total" in text
    assert main(["inspect", "--routers"]) == 0
    assert "expert-choice" in capsys.readouterr().out


def test_run_artifact(tmp_path, capsys):
    out = tmp_path / "a"
    main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out)])
    np.savez(tmp_path / "in.npz", tokens=np.arange(10, dtype=np.int64).reshape(1, 10))
    assert main(["run", str(out), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 0
    assert np.load(tmp_path / "o.npz")["arr_0"].shape == (1, 10, 256)


def _fails(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and msg in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args,msg", [
    (["compile", "nope.py:build", "--upcycle", "4", "--out", "X"], "model file nope.py does not exist"),
    (["compile", "samples/tiny_gpt.py:nothing", "--upcycle", "4", "--out", "X"], "has no callable 'nothing'"),
    (["compile", GPT, "--upcycle", "4", "--top-k", "5", "--out", "X"], "--top-k must be between 1 and E=4"),
    (["compile", GPT, "--upcycle", "4", "--top-k", "0", "--out", "X"], "--top-k must be between 1 and E=4"),
    (["compile", GPT, "--upcycle", "1", "--top-k", "1", "--out", "X"], "at least 2 experts"),
    (["compile", GPT, "--upcycle", "4", "--to", "tflite", "--out", "X"], "unknown backend 'tflite'"),
    (["compile", "tests/bad_models.py:raises", "--upcycle", "4", "--out", "X"], "factory tests/bad_models.py:raises raised"),
    (["compile", "tests/bad_models.py:no_ffn", "--upcycle", "4", "--out", "X"], "no dense FFN found; looked for"),
    (["compile", "tests/bad_models.py:not_a_model", "--upcycle", "4", "--out", "X"], "must return (model"),
])
def test_bad_input(args, msg, tmp_path, capsys):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    _fails(args, msg, capsys)
    assert not (tmp_path / "X").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".X")], "no temp dir left behind"


def test_existing_out_refused_unless_force(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text('{"moecc_version": "0", "backend": {"name": "onnx"}}')   # an artifact
    _fails(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out)], "already exists; pass --force", capsys)
    assert main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["backend"]["name"] == "torch"


def test_verification_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    """Fault injection: a runtime whose numbers are off by 1e-2 must be refused, leaving nothing."""
    from moecc.backends.torch import runtime
    real = runtime.load

    def off_by_a_bit(path, manifest=None):
        run = real(path, manifest)
        return lambda inputs: [o + 1e-2 for o in run(inputs)]
    monkeypatch.setattr(runtime, "load", off_by_a_bit)
    out = tmp_path / "art"
    _fails(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out)],
           "differs from the PyTorch reference beyond tolerance", capsys)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out), "--no-verify"]) == 0
    assert json.loads((out / "manifest.json").read_text())["verification"] == {"skipped": True}


def test_python_m_entrypoint(root):
    r = subprocess.run([sys.executable, "-m", "moecc", "compile", "--help"], capture_output=True, text=True,
                       env=dict(os.environ))
    assert r.returncode == 0 and "examples:" in r.stdout


def test_autotuned_torch_artifact_carries_its_table(tmp_path, monkeypatch):
    from moecc.backends.torch import machine, select
    monkeypatch.setattr(machine, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(select, "BUCKET_TOKENS", (1, 8, 64, 80, 96))       # keep the measurement small
    out = tmp_path / "a"
    assert main(["compile", GPT, "--upcycle", "4", "--top-k", "2", "--autotune", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert "kernels.json" in m["backend"]["files"] and (out / "kernels.json").exists()
    tables = select.load(out / "kernels.json")
    assert len(tables) == 1 and all(b["kernel"] in b["times_ms"] for b in next(iter(tables.values()))["buckets"])
    assert all(k["kernel"] == f"torch.auto@{next(iter(tables))}" and "bucket" in k["reason"]   # its own table
               for k in m["backend"]["kernels"])


@pytest.mark.parametrize("flags,router,refit", [(["--to", "onnx"], "linear", "outputs"),
                                                (["--to", "tvm"], "linear", "outputs"),
                                                (["--moefy-router", "mlp", "--no-refit", "--to", "onnx"], "mlp", "biases")])
def test_compile_moefy_records_its_facts(flags, router, refit, tmp_path, capsys):
    import torch
    g = torch.Generator().manual_seed(1)
    cal = tmp_path / "cal.pt"
    torch.save((torch.randint(0, 512, (24, 12), generator=g), torch.ones(24, 12, dtype=torch.long)), cal)
    out = tmp_path / "bert_moe"
    assert main(["compile", BERT, "--moefy", "4", "--top-k", "2", "--calibration", str(cal), *flags,
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["ok"] and len(m["layers"]) == 3
    facts = m["layers"][0]["moefy"]
    assert (facts["router"], facts["refit"], facts["active_fraction"]) == (router, refit, 0.5)
    assert facts["calibration"]["tokens"] == 288 and 0 < facts["held_out_ffn_error"] < 1


@pytest.mark.parametrize("cal,msg", [("missing.txt", "missing.txt"), ("empty.txt", "empty")])
def test_moefy_bad_calibration_writes_nothing(cal, msg, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    _fails(["compile", BERT, "--moefy", "4", "--calibration", str(tmp_path / cal), "--out",
            str(tmp_path / "X")], msg, capsys)
    assert not (tmp_path / "X").exists()


def test_onnx_artifact_dispatches_by_token_count_at_run_time(tmp_path):
    """No --tokens: each layer carries one kernel per token bucket behind ONNX Ifs (the fused op at
    decode), named in the manifest; the artifact matches the dense model in every bucket."""
    import torch

    from moecc.backends.onnx.runtime import load
    from tiny_gpt import build
    out = tmp_path / "art"
    assert main(["compile", GPT, "--upcycle", "4", "--top-k", "2", "--to", "onnx", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert "tokens" not in m["backend"]["options"]
    kernels = [k["kernel"] for k in m["backend"]["kernels"]]
    assert len(kernels) == 4 and all(k.startswith("onnx.by_tokens:ort.moe_fused@") for k in kernels)
    buckets = kernels[0].split(":")[1:]                        # ['ort.moe_fused@8', ..., 'onnx.gather']
    assert len(buckets) >= 2 and "@" not in buckets[-1]
    run = load(out, m)
    model, _ = build()
    for S in (1, 12, 40):                                      # below, between and above the bounds
        tokens = torch.randint(0, 256, (1, S))
        with torch.no_grad():
            want = model(tokens).numpy()
        assert float(np.abs(run([tokens.numpy()])[0] - want).max()) < 1e-4
