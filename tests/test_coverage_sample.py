"""samples/coverage.py on a slice: two families through the whole script (child processes, table).

mixtral (a recognizer wins) and dots1 (captured through the ExpertsInterface), torch backend only so
the test stays short; the rows must say how each was captured and that the torch artifact matches HF
eager on the unseen token count.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
sys.path.insert(0, str(SAMPLES))
import coverage  # noqa: E402


def test_coverage_two_families(tmp_path):
    rc = coverage.main(["--families", "mixtral,dots1", "--backends", "torch", "--no-hf-onnx",
                        "--out", str(tmp_path), "--timeout", "600"])
    assert rc == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    rows = {r["family"]: r for r in data["rows"]}
    assert set(rows) == {"mixtral", "dots1"}
    assert rows["mixtral"]["captured"]["how"] == "recognizer"
    assert rows["dots1"]["captured"]["how"] == "interface"
    for r in rows.values():
        assert r["reference"]["ok"] and r["torch"]["ok"], r
        assert r["torch"]["err"] <= coverage.TOL
    assert data["meta"]["summary"]["exact_all_backends"] == 2
    md = (tmp_path / "coverage.md").read_text()
    assert "| dots1 | interface (1 layers)" in md and "| mixtral | recognizer (2 layers)" in md

    # --resume --families mixtral: mixtral runs again, dots1's row and a row that did not build stay,
    # and transformers' exporter cell (not run again: --no-hf-onnx) is carried over, marked
    data["rows"] = [dict(r, hf_onnx={"ok": True, "err": 1e-6}) if r["family"] == "mixtral" else r
                    for r in data["rows"]] + [{"family": "jamba", "model_type": "jamba", "text": True,
                                               "build_error": "RuntimeError: fixed length"}]
    (tmp_path / "coverage.json").write_text(json.dumps(data))
    assert coverage.main(["--families", "mixtral", "--backends", "torch", "--no-hf-onnx", "--resume",
                          "--out", str(tmp_path), "--timeout", "600"]) == 0
    again = {r["family"]: r for r in json.loads((tmp_path / "coverage.json").read_text())["rows"]}
    assert set(again) == {"mixtral", "dots1", "jamba"} and again["dots1"] == rows["dots1"]
    assert again["mixtral"]["hf_onnx"] == {"ok": True, "err": 1e-6, "carried": True}
    md = (tmp_path / "coverage.md").read_text()
    assert "ok 1.0e-06 (*)" in md and "jamba: its Mamba layers" in md


def test_unknown_family_is_one_line(tmp_path, capsys):
    assert coverage.main(["--families", "not_a_family", "--out", str(tmp_path)]) == 2
    assert "not MoE families" in capsys.readouterr().err
