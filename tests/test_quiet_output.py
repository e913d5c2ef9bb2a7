"""Quiet, honest output: a compile prints moecc's lines only (no torchvision notes, no torch-internal
FutureWarnings, no torch error log before moecc's one line), and an install has no setuptools banner."""
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

import moecc


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


NOISE = ("torchvision", "FutureWarning", "LeafSpec", "DeprecationWarning", "Traceback", "_registration.py")


def _cli(root, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "samples"), str(root / "tests")]))
    return subprocess.run([sys.executable, "-m", "moecc", *args], cwd=root, capture_output=True, text=True, env=env)


def test_onnx_compile_prints_moecc_lines_only(root, tmp_path):
    """A fresh process (torch's log handlers write to the real stderr): no torchvision notes, no
    warnings, no traceback; stdout is moecc's summary."""
    r = _cli(root, "compile", "tests/early_models.py:small_gpt", "--upcycle", "2", "--top-k", "1", "--to", "onnx",
             "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [n for n in NOISE + ("Warning", "warning") if n in r.stdout + r.stderr], r.stderr[-3000:]
    assert r.stdout.startswith(str(tmp_path / "a")) and "verification ok" in r.stdout


def test_api_compile_warns_nothing_from_torch_internals(tmp_path):
    """API compile (ONNX export and the perturbed twin's deepcopy rebuild torch treespecs): no
    FutureWarning about torch's own LeafSpec reaches the user's warnings."""
    from tiny_gpt import build
    model, inputs = build(layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moecc.compile(model, inputs, passes=[("upcycle", {"num_experts": 2, "top_k": 1})], backend="onnx",
                      out=tmp_path / "onnx", progress=False)
    assert not [w for w in caught if "LeafSpec" in str(w.message)], [str(w.message)[:100] for w in caught]


def test_wrong_input_shape_is_one_line(root, tmp_path):
    r = _cli(root, "compile", "tests/early_models.py:wrong_shape", "--upcycle", "2", "--out", str(tmp_path / "x"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("moecc: error: could not capture") and "[8, 16]" in lines[0]


def test_pyproject_ships_every_package_dir(root):
    """setuptools warns ("Package 'moecc.data' is absent from the `packages` configuration") for a
    directory of shipped files that is not listed: every such directory is listed."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(config["packages"]), config["package-dir"]
    data = config.get("package-data", {})
    for package, folder in dirs.items():
        for d in [Path(folder), *[p for p in Path(root / folder).rglob("*") if p.is_dir()]]:
            d = d if d.is_absolute() else root / d
            if d.name == "__pycache__":
                continue
            name = ".".join([package, *d.relative_to(root / folder).parts])
            shipped = any(d.glob("*.py")) or any(any(d.glob(p)) for p in data.get(name, []))
            parent_data = [p for pkg, pats in data.items() for p in pats
                           if "/" in p and (root / dirs.get(pkg, pkg.replace(".", "/"))).joinpath(p).parent == d]
            if shipped or parent_data:
                assert name in listed, f"{name} ({d}) ships files but is not in [tool.setuptools] packages"
    assert "*.txt" in data.get("moecc.data", []), "the shipped corpus must stay package data"
