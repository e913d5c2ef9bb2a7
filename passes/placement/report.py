"""Human-readable comparisons: a markdown table of metrics and a heatmap of per-device load.

    table({"eplb": Metrics, "graph": Metrics}, layers=58, baseline="eplb") -> str   (markdown)
    heatmap({"contiguous": loads, "graph": loads}, "load.png")   loads [L, D]: one panel per plan,
                                                                  colour = load / the layer's mean
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import Metrics

COLUMNS = ("method", "balancedness", "node sends/tok", "node moves/tok", "node traffic ×base",
           "inter-node ×base", "device traffic ×base", "a2a ms", "plan s")


def rows(results: dict[str, Metrics], layers: int, baseline: str | None = "eplb") -> list[list]:
    """One row per method, values as in COLUMNS (traffic per token and layer; ratios to baseline)."""
    base = results.get(baseline) if baseline else None
    out = []
    for name, m in results.items():
        per = max(m.tokens * layers, 1)

        def ratio(value, attr):
            ref = getattr(base, attr) if base is not None else 0
            return value / ref if ref else float("nan")

        out.append([name, m.balancedness, m.node_sends / per, m.node_moves / per,
                    ratio(m.node_traffic, "node_traffic"),
                    ratio(m.inter_node_sends, "inter_node_sends"),
                    ratio(m.device_traffic, "device_traffic"), m.a2a_ms, m.planning_s])
    return out


def table(results: dict[str, Metrics], layers: int, baseline: str | None = "eplb") -> str:
    """Markdown table of `rows` (ratios relative to `baseline`, if it is among the results)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results, layers, baseline):
        cells = [row[0]] + [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(loads: dict[str, np.ndarray], path: str | Path, title: str = "") -> None:
    """PNG with one panel per plan: layers (rows) x devices (columns), load / layer mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(loads) + 1.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(loads), squeeze=False)[0]
    rel = {name: load / np.maximum(load.mean(1, keepdims=True), 1e-12) for name, load in loads.items()}
    top = max(2.0, max(float(r.max()) for r in rel.values()))
    image = None
    for ax, (name, r) in zip(axes, rel.items()):
        bal = loads[name].mean(1).sum() / max(loads[name].max(1).sum(), 1e-12)
        image = ax.imshow(r, aspect="auto", cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(f"{name}  (balancedness {bal:.3f})", fontsize=9)
        ax.set_xlabel("device")
        ax.set_ylabel("MoE layer")
    fig.colorbar(image, ax=list(axes), label="load / layer mean")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
