"""`moecc bench` output: targets checked per point, a markdown table, JSON and a PNG plot.

    rows(results) -> [{shape, T, limit, best kernel, chosen, ratios, targets met}]
    targets(results) -> [{what, target, worst, met}]   issue 16's table, worst point per row
    write(results, out_dir) -> {"md", "json", "png"} paths        markdown(results) -> str
`results` is one run (`grid.run_bench`) or several thread counts (`grid.run_threads`: {"runs": [...]}).

Targets (ratios within one run, issue 16): the fastest torch kernel ≤ 1.10 × the limit at T = 1,
≤ 1.30 × at T = 8–64, ≤ 1.15 × at T ≥ 512; chosen ≤ 1.05 × the fastest; the fastest TVM kernel ≤ 1.25 ×
the fastest torch kernel; the fastest no slower than ORT's fused op and both transformers implementations.
"""
from __future__ import annotations

import json
import os
import pathlib

ALTS = ("ort:fused", "hf:eager", "hf:grouped_mm")


SELECTION, TVM = 1.05, 1.25


def limit_target(tokens: int) -> float:
    return 1.10 if tokens == 1 else 1.15 if tokens >= 512 else 1.30


def _runs(results: dict) -> list[dict]:
    return results["runs"] if "runs" in results else [results]


def rows(results: dict) -> list[dict]:
    out = []
    for p in results["points"]:
        med = {n: t["median_ms"] for n, t in p["times"].items()}
        ours = {n: v for n, v in med.items() if n.startswith("moecc:") and n != "moecc:auto"}
        best = min(ours, key=ours.get)
        tvm = {n: v for n, v in med.items() if n.startswith("tvm:")}
        best_tvm = min(tvm, key=tvm.get) if tvm else None
        chosen = med.get(p["chosen"])
        row = {"shape": p["shape"], "T": p["tokens"], "limit_ms": p["limit_ms"],
               "bound": "compute" if p["compute_limit_ms"] >= p["memory_limit_ms"] else "memory",
               "best": best, "best_ms": ours[best], "chosen": p["chosen"], "chosen_ms": chosen,
               "auto_ms": med.get("moecc:auto"), "dense_gemm_ms": med.get("ref:dense_gemm"),
               "chosen_over_best": chosen / ours[best] if chosen else None,
               "best_over_limit": ours[best] / p["limit_ms"], "best_tvm": best_tvm,
               "tvm_over_best": tvm[best_tvm] / ours[best] if tvm else None}
        for a in ALTS:
            row[a] = med.get(a)
            row[f"best_over_{a}"] = ours[best] / med[a] if a in med else None
        row["ok_selection"] = row["chosen_over_best"] is not None and row["chosen_over_best"] <= SELECTION
        row["ok_limit"] = row["best_over_limit"] <= limit_target(p["tokens"])
        row["ok_alternatives"] = all(row[f"best_over_{a}"] is None or row[f"best_over_{a}"] <= 1.0 for a in ALTS)
        row["ok_tvm"] = row["tvm_over_best"] is None or row["tvm_over_best"] <= TVM
        out.append(row)
    return out


BANDS = (("best torch / limit, T=1", lambda T: T == 1, "best_over_limit", 1.10),
         ("best torch / limit, T=8–64", lambda T: 1 < T < 512, "best_over_limit", 1.30),
         ("best torch / limit, T≥512", lambda T: T >= 512, "best_over_limit", 1.15),
         ("chosen / best torch", lambda T: True, "chosen_over_best", SELECTION),
         ("best TVM / best torch", lambda T: True, "tvm_over_best", TVM)) + tuple(
    (f"best torch / {a}", lambda T: True, f"best_over_{a}", 1.0) for a in ALTS)


def targets(results: dict) -> list[dict]:
    """Issue 16's table for one run: per row the range over the grid's points, points over the target."""
    rs = rows(results)
    out = []
    for what, band, key, target in BANDS:
        vals = [(r[key], r) for r in rs if band(r["T"]) and r[key] is not None]
        if not vals:
            out.append({"what": what, "target": target, "lo": None, "hi": None, "misses": [], "n": 0})
            continue
        out.append({"what": what, "target": target, "lo": min(v for v, _ in vals), "hi": max(v for v, _ in vals),
                    "n": len(vals), "misses": [f"{r['shape']} T={r['T']} {v:.2f}" for v, r in vals if v > target]})
    return out


def _targets_md(results: dict) -> list[str]:
    runs = _runs(results)
    lines = ["| what | target | " + " | ".join(f"{r['threads']} thread(s) (load {_load(r.get('load_before'))})"
                                              for r in runs) + " |", "|---|---:|" + "---|" * len(runs)]
    per_run = [targets(r) for r in runs]
    for i, (what, _, _, target) in enumerate(BANDS):
        cells = []
        for t in (pr[i] for pr in per_run):
            if not t["n"]:
                cells.append("—")
            else:
                met = f"met ({t['n']} points)" if not t["misses"] else f"✗ {len(t['misses'])}/{t['n']} miss"
                cells.append(f"{t['lo']:.2f}–{t['hi']:.2f} {met}")
        lines.append(f"| {what} | ≤{target:.2f} | " + " | ".join(cells) + " |")
    return lines


def _load(avg) -> str:
    return "?" if not avg else f"{avg[0]:.1f}"


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _mark(ok: bool) -> str:
    return "" if ok else " ✗"


def markdown(results: dict) -> str:
    runs = _runs(results)
    head = runs[-1]
    lines = [f"# moecc bench — {head['machine']}", "",
             f"Targets (issue 16), range over the grid's points; the {head['threads']}-thread run is the headline. "
             "Each run's limit uses the square-matmul rate and the stream time measured at its own thread count.",
             ""] + _targets_md(results) + [""]
    for r in reversed(runs):
        lines += _run_markdown(r)
    return "\n".join(lines) + "\n"


def _run_markdown(results: dict) -> list[str]:
    lines = [f"## {results['threads']} thread(s)", "",
             f"threads={results['threads']}, {results.get('clock', 'wall')} clock, median of {results['repeats']} "
             f"interleaved repeats{_settle(results)}, started {results['started']}, load average before/after "
             f"{_load(results.get('load_before'))} / {_load(results.get('load_after'))} "
             f"(on {os.cpu_count()} CPUs); versions {results['versions']}", ""]
    for name, s in results["shapes"].items():
        lines.append(f"- {name}: square-matmul {s['gemm_flops'] / 1e9:.0f} GFLOP/s"
                     + (f"; skipped {s['skipped']}" if s["skipped"] else ""))
    lines += ["", "| shape | T | limit ms (bound) | best moecc | best ms | chosen | chosen/best | best/limit "
              "| best TVM | TVM/best | ORT ms | HF eager ms | HF grouped ms | best/ORT | best/HF-e | best/HF-g |",
              "|---|---:|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows(results):
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['limit_ms']:.2f} ({r['bound']}) | {r['best'][6:]} | {r['best_ms']:.2f} "
            f"| {r['chosen'][6:]} | {_f(r['chosen_over_best'])}{_mark(r['ok_selection'])} "
            f"| {r['best_over_limit']:.2f}{_mark(r['ok_limit'])} | {r['best_tvm'][4:] if r['best_tvm'] else '—'} "
            f"| {_f(r['tvm_over_best'])}{_mark(r['ok_tvm'])} | {_f(r['ort:fused'])} | {_f(r['hf:eager'])} "
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
    tvm = [r for r in rs if r["tvm_over_best"] is not None]
    lines += ["", f"Targets met: selection {sum(r['ok_selection'] for r in rs)}/{len(rs)}, "
              f"limit {sum(r['ok_limit'] for r in rs)}/{len(rs)}, "
              + (f"tvm {sum(r['ok_tvm'] for r in tvm)}/{len(tvm)}, " if tvm else "tvm not measured, ")
              + f"alternatives {sum(r['ok_alternatives'] for r in rs)}/{len(rs)} (✗ marks a miss).", ""]
    return lines


REFERENCE_LINES = ((1.0, "= limit"), (1.1, "1.1x limit"), (1.3, "1.3x limit"))


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(results: dict):
    """One row of panels (a shape each) per thread count, the headline (most threads) on top: time /
    limit against tokens, the reference lines and the region below the limit labelled on the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(reversed(_runs(results)))
    shapes = list(runs[0]["shapes"])
    names = sorted({n for r in runs for p in r["points"] for n in p["times"] if n != "ref:stream"})
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}     # one colour per name
    fig, axes = plt.subplots(len(runs), len(shapes), figsize=(5 * len(shapes), 4 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        _plot_run(row, run, shapes, names, colors)
    handles = [plt.Line2D([], [], color=colors[n], marker="o", linestyle="-" if n.startswith("moecc:") else "--",
                          label=n) for n in names]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"moecc bench at {', '.join(str(r['threads']) for r in runs)} thread(s): each implementation's "
                 "median time / the limit, limit = max(active FLOPs / measured matmul peak, measured stream of "
                 "the hit experts' bytes) at each thread count; solid: moecc kernels, dashed: alternatives",
                 fontsize=8)
    fig.tight_layout()
    return fig


def _plot_run(axes, results: dict, shapes: list, names: list, colors: dict) -> None:
    for ax, shape in zip(axes, shapes):
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
               ylabel="time / limit (lower is better; 1 = limit)", title=f"{shape}, {results['threads']} thread(s)")


def write(results: dict, out_dir) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "runs" in results:
        results = {**results, "runs": [{**r, "summary": rows(r), "targets": targets(r)} for r in results["runs"]]}
    else:
        results = {**results, "summary": rows(results), "targets": targets(results)}
    paths = {"md": out / "bench.md", "json": out / "bench.json", "png": out / "bench.png"}
    paths["md"].write_text(markdown(results))
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    plot(results, paths["png"])
    return paths


def _settle(results: dict) -> str:
    ms = results.get("settle_ms")
    return "" if ms is None else f" (each after a {ms:.0f} ms pause; ORT and TVM thread pools not spinning)"
