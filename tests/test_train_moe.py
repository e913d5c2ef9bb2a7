"""samples/train_moe.py runs end to end (structure only: a few steps cannot show balancing)."""
import train_moe


def test_train_moe_writes_report_and_plots(tmp_path, capsys):
    rc = train_moe.main(["--steps", "4", "--dense-steps", "2", "--runs", "softmax,sigmoid+bias,dense",
                         "--dim", "16", "--layers", "1", "--ffn", "32", "--batch", "2", "--seq", "16",
                         "--experts", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "softmax: loss" in out and "sigmoid+bias: loss" in out and "dense: loss" in out
    assert "balancing off vs on" in out
    report = (tmp_path / "report.md").read_text()
    assert "| softmax | " in report and "| blocks.0.ffn | " in report and "| dense | " in report
    for run in ("softmax", "sigmoid_bias"):
        assert (tmp_path / f"utilization_{run}.png").read_bytes()[:4] == b"\x89PNG"
