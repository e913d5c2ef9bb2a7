"""bench.png says what it shows: its reference lines are labelled, the region below the limit is
explained, the title defines the limit."""
from moecc.bench.report import figure, plot

RESULTS = {"threads": 2, "shapes": {"tiny": {}}, "points": [
    {"shape": "tiny", "tokens": t, "limit_ms": 1.0,
     "times": {"moecc:torch.loop": {"median_ms": m}, "ort:fused": {"median_ms": 2 * m}, "ref:stream": {"median_ms": 1}}}
    for t, m in ((1, 0.03), (64, 1.2))]}


def test_bench_plot_labels_its_lines(tmp_path):
    fig = figure(RESULTS)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert {"= limit", "1.1x limit", "1.3x limit"} <= set(texts)
    assert any(t.startswith("below 1: faster than the estimated limit") for t in texts)
    assert "limit = max(active FLOPs" in fig._suptitle.get_text()
    assert "1 = limit" in fig.axes[0].get_ylabel()
    plot(RESULTS, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
