"""Tables of samples/overlap_bench.py's runs: OUT/overlap.md, OUT/overlap.json, OUT/overlap_trace.json
(balanced headline at d*), OUT/overlap_trace_zipf.json (Zipf headline at d*) and
OUT/overlap_trace_zipf_planned.json (Zipf on the planned placement)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from moecc.distributed.timeline import Timeline, write_chrome_trace
from moecc.table import md_table

DEGREES = [str(d) for d in range(1, 9)]


def _best(run) -> str:
    return min(DEGREES, key=lambda d: run["measured"][d])


def _ratio(run) -> str:
    """comm : compute of the serial run, measured per rank (mean, and the range over ranks)."""
    r = run.get("ratio_measured") or []
    return f"{statistics.mean(r):.2f} ({min(r):.2f}-{max(r):.2f})" if r else "-"


def by_alpha(runs: list[dict]) -> list[str]:
    """The simulator's accuracy per α of the grid, beside how often the real gloo exchange outlasted
    the transport's α–β delay (late calls: there the run is not an α–β channel)."""
    lines = []
    for a in sorted({r["config"]["alpha"] for r in runs}):
        sel = [r for r in runs if r["config"]["alpha"] == a]
        s = _summary(sel, "predicted", "chosen")
        lines.append(f"  - α = {a * 1e3:g} ms: {s['configs']} configurations, within ±10% {s['pred_within_10pct']}/"
                     f"{s['predictions']} (median |error| {s['pred_median_abs_err']:.1%}), d* within 5% "
                     f"{s['degree_within_5pct']}/{s['configs']}, late calls {s['late_calls'] / s['configs']:.0f} "
                     "per configuration")
    return lines


def summarize(runs: list[dict]) -> dict:
    out = _summary(runs, "predicted", "chosen")
    if all("predicted_base" in r for r in runs):         # the probe before 2026-12-03, same runs
        base = _summary(runs, "predicted_base", "chosen_base")
        out.update({f"base_{k}": base[k] for k in ("degree_within_5pct", "pred_within_10pct",
                                                   "pred_median_abs_err")})
    return out


def _summary(runs: list[dict], pred: str, chosen: str) -> dict:
    within5 = [r["measured"][str(r[chosen])] <= 1.05 * r["measured"][_best(r)] for r in runs]
    errs = [r[pred][k] / r["measured"][k] - 1 for r in runs for k in ["serial", *DEGREES]]
    errs_star = [r[pred][str(r[chosen])] / r["measured"][str(r[chosen])] - 1 for r in runs]
    errs_serial = [r[pred]["serial"] / r["measured"]["serial"] - 1 for r in runs]
    return {"configs": len(runs), "degree_within_5pct": sum(within5),
            "pred_within_10pct": sum(abs(e) <= 0.10 for e in errs), "predictions": len(errs),
            "pred_median_abs_err": statistics.median(abs(e) for e in errs),
            "pred_within_10pct_at_chosen": sum(abs(e) <= 0.10 for e in errs_star),
            "pred_within_10pct_serial": sum(abs(e) <= 0.10 for e in errs_serial),
            "late_calls": sum(r["late_calls"] for r in runs)}


def _bottleneck(run) -> int:
    """The rank with the most compute in the serial run (smallest comm : compute): it sets the step."""
    r = run.get("ratio_measured") or [0.0]
    return min(range(len(r)), key=lambda i: r[i])


def _chosen(train: dict) -> str:
    """The key ("d,b") of the pair the cost model chose ("" when the run has none)."""
    return ",".join(map(str, train.get("chosen", [])))


def _backward_accuracy(trains: list[dict]) -> str:
    errs = [abs(v["predicted_backward"] / v["backward"] - 1) for t in trains for v in t["pairs"].values()]
    return (f"backward predicted within ±10% on {sum(e <= 0.10 for e in errs)}/{len(errs)} pairs (median "
            f"|error| {sorted(errs)[len(errs) // 2]:.1%})")


def train_section(trained: list[dict]) -> list[str]:
    """--train: the training step's variants, and every (degree, backward degree) pair against the
    cost model (forward: costmodel.pipeline, backward: costmodel.backward_pipeline)."""
    rows, pairs, summary = [], [], []
    for r in trained:
        t, name = r["train"], r["config"]["name"]
        variants = t.get("variants", t)                 # runs before the pairs: {variant: ...} only
        serial = variants["serial"]["step"]
        for key, v in variants.items():
            rows.append([name, key, f"{v['step'] * 1e3:.1f}", f"{serial / v['step']:.2f}x", f"{v['hidden']:.1%}"])
        if not t.get("pairs"):
            continue
        best = min(t["pairs"], key=lambda k: t["pairs"][k]["step"])
        for key, v in t["pairs"].items():
            mark = " (chosen)" if key == _chosen(t) else ""
            mark += " (best)" if key == best else ""
            err = v["predicted_backward"] / v["backward"] - 1 if "predicted_backward" in v else float("nan")
            pairs.append([name, key.replace(",", " / ") + mark, f"{v['forward'] * 1e3:.1f}", f"{v['backward'] * 1e3:.1f}",
                          f"{v.get('predicted_backward', float('nan')) * 1e3:.1f}", f"{err:+.1%}",
                          f"{v['step'] * 1e3:.1f}", f"{serial / v['step']:.2f}x", f"{v['hidden']:.1%}"])
        if "chosen" in t:
            ch = t["pairs"][_chosen(t)]
            summary.append(f"- {name}: chosen (d, b) = ({t['chosen'][0]}, {t['chosen'][1]}) runs "
                           f"{ch['step'] * 1e3:.1f} ms, {ch['step'] / t['pairs'][best]['step'] - 1:+.1%} from the "
                           f"best measured pair ({best.replace(',', ', ')}: {t['pairs'][best]['step'] * 1e3:.1f} ms), "
                           f"{serial / ch['step']:.2f}x vs no overlap; {_backward_accuracy([t])}")
    scored = [r["train"] for r in trained if r["train"].get("chosen")]
    if len(scored) > 1:
        near = sum(t["pairs"][_chosen(t)]["step"] <= 1.05 * min(v["step"] for v in t["pairs"].values())
                   for t in scored)
        summary.insert(0, f"- over {len(scored)} configurations: the chosen (d, b) within 5% of the best measured "
                          f"pair on {near}/{len(scored)}; {_backward_accuracy(scored)}")
    out = ["## Training step (forward + backward, --train)", "",
           md_table(["routing", "variant", "ms", "speedup vs no overlap", "hidden"], rows), ""]
    if pairs:
        out += ["### Forward degree d / backward degree b (pipelined backward; b divides d)", "", *summary, "",
                md_table(["routing", "d / b", "forward ms", "backward ms", "backward predicted ms",
                          "pred err backward", "step ms", "speedup vs no overlap", "hidden"], pairs), ""]
    return out


def write_report(runs: list[dict], out: Path, seconds: float, setup: str = "") -> Path:
    out = Path(out)
    s = summarize(runs)
    head = [r for r in runs if not r["config"]["name"].startswith("g")]
    lines = ["# Overlap benchmark (samples/overlap_bench.py)", "",
             "Chunked expert-parallel layer on gloo ranks on 127.0.0.1, each collective delayed to an "
             f"α–β model (a sleep) by moecc.distributed.transport. {setup} {seconds / 60:.1f} min wall. "
             "Times: the slowest rank; the fastest of the timed repeats. "
             "Hidden fraction: hidden comm / comm by interval union, summed over ranks ('per rank': each "
             "rank's own; 'bottleneck rank': the rank with the most compute, which sets the step). "
             "comm:compute measured: per rank, comm / compute (interval unions) in the serial run of "
             "the same configuration (mean, range over ranks); compute intervals are the ranks' real "
             "compute, stretched where 4 ranks share 2 cores. 'serial' = no overlap (every collective "
             "waited at once); d* = the cost model's choice from constants measured at start-up.", "",
             "## Headline (4 ranks, comm:compute ≈ 1)", ""]
    rows = []
    for r in head:
        d, b = str(r["chosen"]), _best(r)
        k = _bottleneck(r)
        rows.append([r["config"]["name"], _ratio(r), d, f"{r['overlap'][d]:.1%}",
                     " / ".join(f"{f:.0%}" for f in r["overlap_per_rank"][d]),
                     f"{r['overlap_per_rank'][d][k]:.0%} (rank {k})", f"{r['overlap'][b]:.1%} (d={b})",
                     f"{r['measured']['serial'] * 1e3:.1f}", f"{r['measured'][d] * 1e3:.1f}",
                     f"{r['measured']['serial'] / r['measured'][d]:.2f}x",
                     f"{r['predicted_overlap'][d]:.1%}", f"{r['predicted'][d] / r['measured'][d] - 1:+.1%}"])
    lines += [md_table(["routing", "comm:compute measured", "d*", "hidden at d*", "per rank",
                        "bottleneck rank", "hidden at best d", "serial ms", "d* ms", "speedup", "predicted hidden",
                        "pred err d*"], rows), ""]
    trained = [r for r in runs if r.get("train")]
    if trained:                                       # --train: forward + backward of the headline
        lines += train_section(trained)
    lines += ["## Summary over the grid", "",
              f"- configurations: {s['configs']} (tokens, hidden, experts, k, α, comm:compute, skew, "
              "shared expert, 2 or 4 ranks)",
              f"- degree chosen by the cost model within 5% of the best measured degree: "
              f"{s['degree_within_5pct']}/{s['configs']}",
              f"- simulator within ±10% of the measured step time: {s['pred_within_10pct']}/"
              f"{s['predictions']} predictions (serial and d = 1..8; median |error| "
              f"{s['pred_median_abs_err']:.1%}); at d*: {s['pred_within_10pct_at_chosen']}/{s['configs']}; "
              f"serial: {s['pred_within_10pct_serial']}/{s['configs']}; by α:",
              *by_alpha(runs),
              *([f"- the same runs against the probe before 2026-12-03 (compute timed uncontended, no lone "
                  f"exchange, no dispatch reading): d* within 5% {s['base_degree_within_5pct']}/{s['configs']}, "
                  f"within ±10% {s['base_pred_within_10pct']}/{s['predictions']} (median |error| "
                  f"{s['base_pred_median_abs_err']:.1%})"] if "base_pred_within_10pct" in s else []),
              f"- collectives whose real gloo exchange outlasted the α–β model (late): {s['late_calls']}", "",
              "## Every configuration", ""]
    rows = []
    for r in runs:
        c, d, b = r["config"], str(r["chosen"]), _best(r)
        rows.append([c["name"], c["world"], c["tokens"], c["hidden"], c["experts"], c["top_k"],
                     f"{c['alpha'] * 1e3:g}", c["ratio"], c["skew"], "y" if c["shared"] else "n", d, b,
                     f"{r['measured']['serial'] * 1e3:.1f}", f"{r['measured'][d] * 1e3:.1f}",
                     f"{r['measured'][b] * 1e3:.1f}", f"{r['measured']['serial'] / r['measured'][d]:.2f}x",
                     f"{r['overlap'][d]:.0%}",
                     f"{r['predicted']['serial'] / r['measured']['serial'] - 1:+.1%}",
                     f"{r['predicted'][d] / r['measured'][d] - 1:+.1%}", _ratio(r)])
    lines += [md_table(["cfg", "W", "T", "H", "E", "k", "α ms", "c:c", "skew", "shared", "d*", "best d",
                        "serial ms", "d* ms", "best ms", "speedup", "hidden", "pred err serial",
                        "pred err d*", "comm:compute measured"], rows), ""]
    (out / "overlap.md").write_text("\n".join(lines))
    (out / "overlap.json").write_text(json.dumps({"summary": s, "runs": [
        {k: v for k, v in r.items() if k != "timelines"} for r in runs]}, indent=1))
    for r, name in zip(head, ("overlap_trace.json", "overlap_trace_zipf.json", "overlap_trace_zipf_planned.json")):
        if r.get("timelines"):              # each headline run at d*, its fastest repeat
            d = str(r["chosen"])
            write_chrome_trace([Timeline.from_dict(t[d][r["fastest"][d]]) for t in r["timelines"]],
                               out / name)
    return out / "overlap.md"
