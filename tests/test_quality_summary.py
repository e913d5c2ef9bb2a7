"""After --moefy the summary and report.md say, plainly, how far the model moved from the dense one
(verification only compares the backend with the MoEfied graph); an upcycled model shows 0; inspect
never says "verification ok" for an artifact whose model file is missing or truncated."""
import json

import pytest
import torch

from moecc.cli import main

BERT = "samples/tiny_bert.py:build"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def test_moefy_summary_and_report_show_quality_vs_dense(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    cal = tmp_path / "cal.pt"
    torch.save((torch.randint(0, 512, (24, 12), generator=g), torch.ones(24, 12, dtype=torch.long)), cal)
    out = tmp_path / "moefied"
    assert main(["compile", BERT, "--moefy", "4", "--top-k", "1", "--calibration", str(cal), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verification ok" in text and "quality vs the model before the passes (dense)" in text, text
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert [c["label"] for c in q["checks"]] == ["example", "fresh"]
    assert all(0.005 < c["rel_error"] < 2 and c["cosine"] < 0.9999 for c in q["checks"]), q
    assert f"rel error {q['checks'][0]['rel_error']:.3g}" in text
    assert "## Quality against the model before the passes (dense)" in (out / "report.md").read_text()


def test_upcycle_quality_is_exact_and_damaged_artifact_is_not_ok(tmp_path, capsys):
    out = tmp_path / "up"
    assert main(["compile", BERT, "--upcycle", "4", "--top-k", "2", "--out", str(out)]) == 0
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert all(c["rel_error"] < 1e-5 and c["cosine"] > 0.99999 for c in q["checks"]), q
    capsys.readouterr()
    model = out / "model.pt2"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    code = main(["inspect", str(out)])
    captured = capsys.readouterr()
    assert "verification ok" not in captured.out + captured.err
    assert code == 2 and "model.pt2" in captured.err
    model.unlink()
    code = main(["inspect", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "verification ok" not in captured.out + captured.err and "model.pt2" in captured.err
