"""Issue 15 items 3, 12, 13: artifacts that cannot be silently wrong or silently lost.

- fault injection: one expert's weights perturbed in the lowered files (each backend) is refused by
  compile-time verification (even for an upcycled model, whose identical experts hide it from the
  example inputs) and, in a compiled artifact, by `moecc run`'s checksums;
- every file is hashed in the manifest and checked on load: one clear line, no traceback;
- --force replaces only a real moecc artifact, by an atomic swap.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from faults import perturb_one_expert
from moecc import artifact
from moecc.cli import main

GPT = "samples/tiny_gpt.py:build"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def _fails(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and msg in err and len(err.splitlines()) == 1, err


def _tokens(path: Path) -> Path:
    np.savez(path, tokens=np.arange(24, dtype=np.int64).reshape(2, 12) % 200)
    return path


@pytest.mark.parametrize("backend", ["torch", "onnx", "tvm"])
def test_fault_in_one_expert_is_refused_by_verification_and_run(backend, tmp_path, capsys, monkeypatch):
    from moecc import backends
    lower_module = backends.get(backend)
    real_lower = lower_module.lower

    def faulty_lower(program, out_dir, options):
        lowered = real_lower(program, out_dir, options)
        perturb_one_expert(out_dir, backend, expert=5)
        return lowered
    monkeypatch.setattr(lower_module, "lower", faulty_lower)
    out = tmp_path / "bad"
    _fails(["-q", "compile", GPT, "--upcycle", "8", "--top-k", "2", "--to", backend, "--out", str(out)],
           "differs from the PyTorch reference", capsys)        # -q: onnx's fused->portable warning aside
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(lower_module, "lower", real_lower)

    out = tmp_path / "good"                      # experts already differ: one lowering, no twin
    assert main(["compile", "tests/perturbed_models.py:gpt", "--to", backend, "--out", str(out)]) == 0
    inp = _tokens(tmp_path / "in.npz")
    assert main(["run", str(out), "--input", str(inp)]) == 0
    capsys.readouterr()
    perturb_one_expert(out, backend, expert=5)
    _fails(["run", str(out), "--input", str(inp)], "does not match the checksum", capsys)


@pytest.fixture(scope="module")
def torch_artifact(tmp_path_factory):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("a") / "art"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out), "--no-verify"]) == 0
    finally:
        os.chdir(cwd)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_manifest_hashes_every_file(torch_artifact):
    m = json.loads((torch_artifact / "manifest.json").read_text())
    files = {p.name for p in torch_artifact.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == files and {"model.pt2", "report.md"} <= files
    artifact.check_files(torch_artifact, m)


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "model.pt2").write_bytes((d / "model.pt2").read_bytes()[:1000]), "model.pt2 does not match"),
    (lambda d: (d / "model.pt2").unlink(), "model.pt2 is missing"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(
        (d / "manifest.json").read_text()).items() if k != "backend"})), "not a moecc manifest (no 'backend')"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a moecc manifest"),
    (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe{"), "is corrupted"),
], ids=["truncated", "missing", "no-backend", "list", "binary"])
@pytest.mark.parametrize("verb", ["run", "inspect"])
def test_damaged_artifact_is_one_line(verb, damage, msg, torch_artifact, tmp_path, capsys):
    d = _copy(torch_artifact, tmp_path / "copy")
    damage(d)
    args = ["run", str(d), "--input", str(_tokens(tmp_path / "in.npz"))] if verb == "run" else ["inspect", str(d)]
    _fails(args, msg, capsys)


@pytest.mark.parametrize("content", ["{}", '{"moecc_version": "0"}', "not json"])
def test_force_refuses_a_directory_that_is_not_an_artifact(content, tmp_path, capsys):
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "manifest.json").write_text(content)
    (victim / "thesis.tex").write_text("years of work")
    _fails(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(victim), "--force"],
           "is not a moecc artifact", capsys)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_force_swaps_atomically_and_keeps_the_old_artifact_if_the_swap_fails(torch_artifact, tmp_path, monkeypatch):
    out = _copy(torch_artifact, tmp_path / "art")
    before = (out / "manifest.json").read_text()

    def broken_rename(self, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "rename", broken_rename)
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    with pytest.raises(Exception):
        with artifact.atomic_dir(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert (out / "manifest.json").read_text() == before            # nothing the user had is lost
    monkeypatch.undo()
    with artifact.atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]    # no temp dirs left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask                 # not mkdtemp's private 0700


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not artifact._exchange(a, b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
