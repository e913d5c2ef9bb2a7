"""`moecc bench` output: targets checked per point, a markdown table, JSON and a PNG plot.

    rows(results) -> [{shape, T, limit, best kernel, chosen, ratios, targets met}]
    write(results, out_dir) -> {"md", "json", "png"} paths        markdown(results) -> str

Targets (ratios within one run): chosen ≤ 1.10 × the fastest moecc kernel; the fastest ≤ 1.3 × the
limit (≤ 1.1 × at T = 1 and T ≥ 512); the fastest no slower than ORT's fused op and both
transformers implementations.
"""
from __future__ import annotations

import json
import os
import pathlib

ALTS = ("ort:fused", "hf:eager", "hf:grouped_mm")


def limit_target(tokens: int) -> float:
    return 1.1 if tokens == 1 or tokens >= 512 else 1.3


def rows(results: dict) -> list[dict]:
    out = []
    for p in results["points"]:
        med = {n: t["median_ms"] for n, t in p["times"].items()}
        ours = {n: v for n, v in med.items() if n.startswith("moecc:") and n != "moecc:auto"}
        best = min(ours, key=ours.get)
        chosen = med.get(p["chosen"])
        row = {"shape": p["shape"], "T": p["tokens"], "limit_ms": p["limit_ms"],
               "bound": "compute" if p["compute_limit_ms"] >= p["memory_limit_ms"] else "memory",
               "best": best, "best_ms": ours[best], "chosen": p["chosen"], "chosen_ms": chosen,
               "auto_ms": med.get("moecc:auto"), "dense_gemm_ms": med.get("ref:dense_gemm"),
               "chosen_over_best": chosen / ours[best] if chosen else None,
               "best_over_limit": ours[best] / p["limit_ms"]}
        for a in ALTS:
            row[a] = med.get(a)
            row[f"best_over_{a}"] = ours[best] / med[a] if a in med else None
        row["ok_selection"] = row["chosen_over_best"] is not None and row["chosen_over_best"] <= 1.10
        row["ok_limit"] = row["best_over_limit"] <= limit_target(p["tokens"])
        row["ok_alternatives"] = all(row[f"best_over_{a}"] is None or row[f"best_over_{a}"] <= 1.0 for a in ALTS)
        out.append(row)
    return out


def _load(avg) -> str:
    return "?" if not avg else f"{avg[0]:.1f}"


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _mark(ok: bool) -> str:
    return "" if ok else " ✗"


def markdown(results: dict) -> str:
    lines = [f"# moecc bench — {results['machine']}",
             f"threads={results['threads']}, {results.get('clock', 'wall')} clock, median of {results['repeats']} "
             f"interleaved repeats, started {results['started']}, load average before/after "
             f"{_load(results.get('load_before'))} / {_load(results.get('load_after'))} "
             f"(on {os.cpu_count()} CPUs); versions {results['versions']}", ""]
    for name, s in results["shapes"].items():
        lines.append(f"- {name}: square-matmul {s['gemm_flops'] / 1e9:.0f} GFLOP/s"
                     + (f"; skipped {s['skipped']}" if s["skipped"] else ""))
    lines += ["", "| shape | T | limit ms (bound) | best moecc | best ms | chosen | chosen/best | best/limit "
              "| ORT ms | HF eager ms | HF grouped ms | best/ORT | best/HF-e | best/HF-g |",
              "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows(results):
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['limit_ms']:.2f} ({r['bound']}) | {r['best'][6:]} | {r['best_ms']:.2f} "
            f"| {r['chosen'][6:]} | {_f(r['chosen_over_best'])}{_mark(r['ok_selection'])} "
            f"| {r['best_over_limit']:.2f}{_mark(r['ok_limit'])} | {_f(r['ort:fused'])} | {_f(r['hf:eager'])} "
            f"| {_f(r['hf:grouped_mm'])} | {_f(r['best_over_ort:fused'])} | {_f(r['best_over_hf:eager'])} "
            f"| {_f(r['best_over_hf:grouped_mm'])} |")
    names = sorted({n for p in results["points"] for n in p["times"]})
    lines += ["", "All implementations (median ms; runs < repeats = timed once, too slow):", "",
              "| shape | T | " + " | ".join(names) + " | max abs err |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for p in results["points"]:
        cells = [_f(p["times"][n]["median_ms"]) + ("*" if p["times"][n]["runs"] < results["repeats"] else "")
                 if n in p["times"] else "—" for n in names]
        lines.append(f"| {p['shape']} | {p['tokens']} | " + " | ".join(cells)
                     + f" | {max(p['errors'].values(), default=0):.1e} |")
    rs = rows(results)
    lines += ["", f"Targets met: selection {sum(r['ok_selection'] for r in rs)}/{len(rs)}, "
              f"limit {sum(r['ok_limit'] for r in rs)}/{len(rs)}, "
              f"alternatives {sum(r['ok_alternatives'] for r in rs)}/{len(rs)} (✗ marks a miss)."]
    return "\n".join(lines) + "\n"


REFERENCE_LINES = ((1.0, "= limit"), (1.1, "1.1x limit"), (1.3, "1.3x limit"))


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(results: dict):
    """One panel per shape: time / limit against tokens, the reference lines and the region below
    the limit labelled on the plot itself."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(results["shapes"])
    names = sorted({n for p in results["points"] for n in p["times"] if n != "ref:stream"})
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}     # one colour per name
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        pts = [p for p in results["points"] if p["shape"] == shape]
        for n in names:
            xs = [p["tokens"] for p in pts if n in p["times"]]
            ys = [p["times"][n]["median_ms"] / p["limit_ms"] for p in pts if n in p["times"]]
            ax.plot(xs, ys, marker="o", label=n, color=colors[n],
                    linestyle="-" if n.startswith("moecc:") else "--")
        for y, label in REFERENCE_LINES:
            ax.axhline(y, color="grey", linewidth=0.6)
            ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=6, color="grey")
        ax.axhspan(ax.get_ylim()[0], 1.0, color="grey", alpha=0.08, linewidth=0)
        ax.annotate("below 1: faster than the estimated limit\n(the limit is measured, not a bound:\n"
                    "e.g. weights already in cache)", (0.02, 0.02), xycoords="axes fraction",
                    fontsize=6, color="grey", va="bottom")
        ax.set(xscale="log", yscale="log", xlabel="tokens T",
               ylabel="time / limit (lower is better; 1 = limit)", title=shape)
    handles = [plt.Line2D([], [], color=colors[n], marker="o", linestyle="-" if n.startswith("moecc:") else "--",
                          label=n) for n in names]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"moecc bench, {results['threads']} threads: each implementation's median time / the limit, "
                 "limit = max(active FLOPs / measured matmul peak, measured stream of the hit experts' bytes); "
                 "solid: moecc kernels, dashed: alternatives", fontsize=8)
    fig.tight_layout()
    return fig


def write(results: dict, out_dir) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "summary": rows(results)}
    paths = {"md": out / "bench.md", "json": out / "bench.json", "png": out / "bench.png"}
    paths["md"].write_text(markdown(results))
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    plot(results, paths["png"])
    return paths
