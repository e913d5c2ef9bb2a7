"""Quality/speed curve of MoEfication (and sparse upcycling, for contrast) on all-MiniLM-L6-v2.

    corpus → calibration / held-out (disjoint, moecc.calibration.split_corpus)
    for E in {4, 8, 16, 32}:  moefy.plan once (partitions, routers)  →  for each k: moefy.apply
        → held-out sentence embeddings vs the dense model's: cosine (mean, worst), nearest-neighbour
          agreement (each sentence's nearest other held-out sentence unchanged), active FFN neurons,
          FFN time MoE / dense at 512 tokens (layer 0, same run, median of repeats)
    upcycle E, k (at init = dense, k full-size experts per token) → the same numbers
    --heal STEPS: every moefy point with E in --heal-experts and 12.5-50% of the FFN active is also
        healed (moefy_heal: distilled from the dense model on the calibration sentences) → cosine and
        NN agreement after healing, healing time; and the whole model's time MoE / dense on the held-out
        sentences (1 thread: CPU time; all cores: wall time)
    → OUT/curve.json, OUT/curve.png, OUT/curve.md

    python samples/moefy_curve.py --out out/moefy_curve [--quick] [--heal 200] [--method cluster]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
import moefy_onnx_speed as onnx_speed  # noqa: E402

from moecc import calibration as calib  # noqa: E402
from moecc.frontend import capture  # noqa: E402
from moecc.ops import call_moe  # noqa: E402
from moecc.passes import moefy, moefy_heal, upcycle  # noqa: E402
from moecc.passes.canonicalize import canonicalize  # noqa: E402
from moecc.passes.ffn_match import find_ffns  # noqa: E402
from moecc.passes.moe_rewrite import param  # noqa: E402
from moecc.pipeline import KERNEL_ARG, moe_nodes  # noqa: E402

TOKENS = 512


def ks_for(E: int, quick: bool) -> list[int]:
    if E <= 16 and not quick:
        return list(range(1, E + 1))
    return sorted({1, 2, max(1, E // 8), E // 4, E // 2, (3 * E) // 4, E})


def kernels() -> list[str]:
    """The torch backend's per-call choice by token count (else its sort + grouped-GEMM kernel, else the
    reference)."""
    try:
        from moecc.backends.torch import kernels as k
        from moecc.backends.torch import select
        return (["torch.auto"] if select.AUTO == "torch.auto" else []) + [
            n for n in ("torch.grouped_gemm",) if n in k.KERNELS][:1] or ["reference"]
    except ImportError:
        return ["reference"]


def use_kernel(gm, kernel: str):
    """Every MoE node runs `kernel` (same numbers as the reference, faster held-out embedding)."""
    for node, _ in moe_nodes(gm):
        node.args = (*node.args[:KERNEL_ARG], kernel, *node.args[KERNEL_ARG + 1:])
    gm.recompile()
    return gm


@torch.no_grad()
def embed(gm, batches) -> torch.Tensor:
    return torch.cat([gm(*b) for b in batches])


def quality(emb: torch.Tensor, dense: torch.Tensor) -> dict:
    cos = F.cosine_similarity(emb, dense, dim=1)
    sim_e, sim_d = emb @ emb.t(), dense @ dense.t()
    sim_e.fill_diagonal_(-2)
    sim_d.fill_diagonal_(-2)
    nn = (sim_e.argmax(1) == sim_d.argmax(1)).float().mean()
    return {"cos_mean": round(cos.mean().item(), 5), "cos_worst": round(cos.min().item(), 5),
            "nn_agreement": round(nn.item(), 4)}


def cpu_time(fn, x, repeats: int, clock=time.thread_time) -> float:
    """Fastest of `repeats` calls, by default in CPU time of this thread (with one torch thread the
    work runs here), so other processes on a shared machine do not inflate it the way wall time does."""
    fn(x)
    times = []
    for _ in range(repeats):
        t = clock()
        fn(x)
        times.append(clock() - t)
    return min(times)


def dense_weights(gm) -> tuple:
    m = find_ffns(gm)[0][0]
    return param(gm, m.w_in[0]), param(gm, m.b_in[0]), param(gm, m.w_out), param(gm, m.b_out)


def dense_ffn(gm):
    w1, b1, w2, b2 = dense_weights(gm)
    return lambda x: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def moe_ffn(gm, kernel: str):
    """Layer 0's router + MoE op as one callable x [T, H] -> [T, H] (the graph's own tensors)."""
    node, spec = next(moe_nodes(gm))
    logits_node = node.args[1]
    get = lambda n: None if n is None else getattr(gm.get_submodule(n.target.rsplit(".", 1)[0]),
                                                   n.target.rsplit(".", 1)[1]).detach()
    w_in, w_out, b_in, b_out = (get(n) for n in node.args[2:6])
    rw, rb = get(logits_node.args[1]), get(logits_node.args[2]) if len(logits_node.args) > 2 else None
    first = logits_node.args[0]
    mlp = (get(first.args[0].args[1]), get(first.args[0].args[2])) if first.op == "call_function" \
        and first.target is torch.ops.aten.relu.default else None

    def run(x):
        h = torch.relu(F.linear(x, *mlp)) if mlp else x
        return call_moe(x, F.linear(h, rw, rb), w_in, w_out, spec, b_in=b_in, b_out=b_out, kernel=kernel)
    return run


def speed(gm, dense_fn, x, repeats: int) -> dict:
    """FFN (layer 0) MoE / dense: 1 thread (thread CPU time) and every core (wall time), per kernel."""
    out, threads = {}, torch.get_num_threads()
    cores = max(threads, os.cpu_count() or 1)
    try:
        for kernel in kernels():
            fn = moe_ffn(gm, kernel)
            for label, n, clock in ((kernel, 1, time.thread_time), (f"{kernel} {cores} threads", cores,
                                                                    time.perf_counter)):
                torch.set_num_threads(n)
                t_dense, t_moe = [], []
                for _ in range(3):   # interleaved, so both see the same machine state
                    t_dense.append(cpu_time(dense_fn, x, repeats, clock))
                    t_moe.append(cpu_time(fn, x, repeats, clock))
                out[label] = round(min(t_moe) / min(t_dense), 3)
    finally:
        torch.set_num_threads(threads)
    return out


def model_speed(gm, base, batches, repeats: int) -> dict:
    """Whole model MoE / dense on the held-out batches: 1 thread (CPU time) and all cores (wall time)."""
    def once(m):
        with torch.no_grad():
            for b in batches:
                m(*b)
    out, threads = {}, torch.get_num_threads()
    cores = max(threads, os.cpu_count() or 1)
    for label, n, clock in (("1 thread", 1, time.thread_time), (f"{cores} threads", cores, time.perf_counter)):
        torch.set_num_threads(n)
        try:
            best = {}
            once(base), once(gm)                            # warm-up at this thread count (kernel choice)
            for _ in range(max(1, repeats)):               # interleaved, fastest of the repeats
                for name, m in (("dense", base), ("moe", gm)):
                    t = clock()
                    once(m)
                    best[name] = min(best.get(name, float("inf")), clock() - t)
            out[label] = round(best["moe"] / best["dense"], 3)
        finally:
            torch.set_num_threads(threads)
    return out


def heal_point(args, gm, base, cal, held_b, dense) -> dict:
    """Heal a copy of the MoEfied graph (moefy_heal) and measure it like the unhealed one."""
    healed = copy.deepcopy(gm)
    facts = moefy_heal.heal(healed, base, cal, args.heal, seed=args.seed, params=args.heal_params,
                            lr=args.heal_lr, routers=args.heal_routers)
    return {**quality(embed(healed, held_b), dense),
            **{k: facts[k] for k in ("steps_run", "best_step", "seconds", "held_out_loss_before",
                                     "held_out_loss_after", "params", "lr", "augment")},
            "routers": args.heal_routers}


def run(args) -> dict:
    cal_lines, held = calib.split_corpus()
    model, example = minilm.build()
    cal = calib.load(cal_lines, minilm.tokenize)
    held_b = calib.load(held, minilm.tokenize).batches
    base = capture(model, example, source="samples/minilm.py:build")
    canonicalize(base.gm)
    dense = embed(base.gm, held_b)
    x0 = calib.collect(base.gm, [find_ffns(base.gm)[0][0].x], calib.load(held, minilm.tokenize))[0]
    x = x0.repeat(TOKENS // x0.shape[0] + 1, 1)[:TOKENS]                         # [512, H] real inputs
    dense_fn = dense_ffn(base.gm)
    grid = [(E, k) for E in args.experts for k in (
        sorted({max(1, round(f * E)) for f in args.fractions}) if args.fractions else args.ks or ks_for(E, args.quick))
        if k <= E]
    rows, bar = [], tqdm(total=len(grid) + len(args.upcycle_k), desc="moefy curve", unit="point")
    plans_for, onnx_cache = {}, {}
    for E, k in grid:
        if E not in plans_for:
            bar.set_postfix_str(f"plan E={E}")
            t = time.perf_counter()
            plans_for[E] = moefy.plan(base.gm, E, method=args.method, shared=args.shared,
                                      router=args.router, calibration=cal, seed=args.seed)[0]
            plan_s = time.perf_counter() - t
        plans = plans_for[E]
        if k <= plans[0].shared:
            bar.update(1)
            continue
        gm = copy.deepcopy(base.gm)
        use_kernel(moefy.apply(gm, plans, k), kernels()[0])
        facts = next(iter(moefy.moefy_facts(gm).values()))
        biases_only = moefy.apply(copy.deepcopy(base.gm), plans, k, refit=False)
        row = {"pass": "moefy", "E": E, "k": k, "active_fraction": facts["active_fraction"],
               **quality(embed(gm, held_b), dense), "no_refit": quality(embed(biases_only, held_b), dense),
               "time_ratio": speed(gm, dense_fn, x, args.repeats) if args.time else {},
               "router_recall": round(statistics.mean(p.facts["router_recall"] for p in plans), 4),
               "plan_seconds": round(plan_s, 1)}
        if args.time and k < E:
            row["model_time_ratio"] = model_speed(gm, base.gm, held_b, 3)
            if args.onnx:
                bar.set_postfix_str(f"onnx E={E} k={k}")
                row["time_ratio"].update(onnx_speed.ffn(gm, dense_weights(base.gm), x, args.repeats, onnx_cache))
                row["model_time_ratio"].update(onnx_speed.model(base, gm, held_b, 3, onnx_cache))
        if args.heal and E in args.heal_experts and 0.125 <= facts["active_fraction"] <= 0.5:
            bar.set_postfix_str(f"heal E={E} k={k}")
            row["healed"] = heal_point(args, gm, base.gm, cal, held_b, dense)
        rows.append(row)
        if args.partial is not None:           # a long run keeps what it has measured so far
            args.partial.write_text(json.dumps(rows, indent=1))
        bar.update(1)
    for k in args.upcycle_k:
        gm = copy.deepcopy(base.gm)
        use_kernel(upcycle.upcycle(gm, num_experts=8, top_k=k).graph_module, kernels()[0])
        rows.append({"pass": "upcycle", "E": 8, "k": k, "active_fraction": float(k),
                     **quality(embed(gm, held_b), dense),
                     "time_ratio": speed(gm, dense_fn, x, args.repeats) if args.time else {}})
        bar.update(1)
    bar.close()
    return {"model": "all-MiniLM-L6-v2 (samples/minilm.py)", "method": args.method, "router": args.router,
            "shared_neurons": args.shared, "seed": args.seed, "calibration": cal.facts(),
            "held_out_sentences": len(held), "tokens_timed": TOKENS, "threads": 1,
            "clock": "thread CPU time, fastest of 3 x repeats, dense and MoE interleaved",
            "kernels": kernels(), "heal_steps": args.heal, "heal_params": args.heal_params,
            "heal_routers": args.heal_routers,
            "threads_all": max(torch.get_num_threads(), os.cpu_count() or 1), "rows": rows}


def _heal_cells(r: dict) -> list[str]:
    h = r.get("healed")
    if not h:
        return ["—", "—"]
    return [f"{h['cos_mean']:.4f} / {h['cos_worst']:.4f} / {h['nn_agreement']:.1%}",
            f"{h['steps_run']} ({h['best_step']}) / {h['seconds']:.0f}"]


def merge_times(result: dict, timed: dict) -> dict:
    """The time ratios of a timing run (same E, k) put into a quality run's rows."""
    by = {(r["pass"], r["E"], r["k"]): r for r in timed["rows"]}
    for r in result["rows"]:
        t = by.get((r["pass"], r["E"], r["k"]), {})
        r["time_ratio"], r["model_time_ratio"] = t.get("time_ratio", {}), t.get("model_time_ratio", {})
    result["timing"] = {k: timed[k] for k in ("threads_all", "clock", "tokens_timed")}
    result["kernels"] = timed["kernels"]
    return result


def table(result: dict) -> str:
    order = lambda k: (k.startswith("onnx"), k)                               # noqa: E731 - torch first
    ffn = sorted({k for r in result["rows"] for k in r.get("time_ratio", {})}, key=order)
    whole = sorted({k for r in result["rows"] for k in r.get("model_time_ratio", {})}, key=order)
    head = ["pass", "E", "k", "active FFN", "cos mean", "cos worst", "NN agree", "no refit: cos / NN"] + [
        f"FFN time {k}" for k in ffn] + [f"model time {k}" for k in whole] + [
        "healed: cos / worst / NN", "heal steps (best) / s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["pass"], r["E"], r["k"], f"{r['active_fraction']:.0%}", f"{r['cos_mean']:.4f}",
                 f"{r['cos_worst']:.4f}", f"{r['nn_agreement']:.1%}",
                 f"{r['no_refit']['cos_mean']:.4f} / {r['no_refit']['nn_agreement']:.1%}" if "no_refit" in r else "—"]
        cells += [f"{r['time_ratio'][k]:.2f}×" if k in r.get("time_ratio", {}) else "—" for k in ffn]
        cells += [f"{r['model_time_ratio'][k]:.2f}×" if k in r.get("model_time_ratio", {}) else "—" for k in whole]
        lines.append("| " + " | ".join(map(str, cells + _heal_cells(r))) + " |")
    heal = (f"Healed: --heal {result.get('heal_steps', 0)} steps, {result.get('heal_params', 'all')} parameters"
            f"{', routers too (straight-through gates)' if result.get('heal_routers') else ''} (steps run, "
            f"best step kept, seconds on the shared machine). " if result.get("heal_steps") else "")
    return (f"# MoEfication curve: {result['model']}\n\nmethod={result['method']}, router={result['router']}, "
            f"shared={result['shared_neurons']} neurons; calibration {result['calibration']['examples']} "
            f"sentences / {result['calibration']['tokens']} tokens; {result['held_out_sentences']} held-out "
            f"sentences; moefy rows refit the output weights by least squares (\"no refit\": biases only). "
            f"FFN time: layer 0's router + MoE / dense FFN at {result['tokens_timed']} tokens; model time: "
            f"the whole model MoE / dense on the held-out sentences (unhealed weights: the same work as "
            f"healed ones); 1 thread: thread CPU time, N threads: wall time; torch eager, "
            f"kernel {', '.join(result['kernels'])}; onnx: moecc's ONNX artifacts of the model / of layer 0 "
            f"alone in onnxruntime (samples/moefy_onnx_speed.py). {heal}\n\n" + "\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kern = result["kernels"][0]
    multi = next((k for r in result["rows"] for k in r.get("time_ratio", {}) if k.startswith(kern + " ")), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    moe_rows = [r for r in result["rows"] if r["pass"] == "moefy"]
    for E in sorted({r["E"] for r in moe_rows}):
        rs = [r for r in moe_rows if r["E"] == E]
        fr = [r["active_fraction"] for r in rs]
        axes[0].plot(fr, [r["cos_mean"] for r in rs], "o-", label=f"moefy E={E}")
        axes[0].plot(fr, [r["cos_worst"] for r in rs], ":", color=axes[0].lines[-1].get_color())
        axes[1].plot(fr, [r["nn_agreement"] for r in rs], "o-", label=f"moefy E={E}")
        color = axes[1].lines[-1].get_color()
        axes[0].plot(fr, [r["no_refit"]["cos_mean"] for r in rs], "x--", color=color, lw=0.7, alpha=0.6)
        axes[1].plot(fr, [r["no_refit"]["nn_agreement"] for r in rs], "x--", color=color, lw=0.7, alpha=0.6)
        for key, style in ((kern, "o-"), (multi, "s--")):
            ts = [(r["active_fraction"], r["time_ratio"][key]) for r in rs if key in r.get("time_ratio", {})]
            if ts:
                axes[2].plot(*zip(*ts), style, color=color, label=f"moefy E={E}" + (" (all cores)" if key == multi else ""))
        hs = [r for r in rs if r.get("healed")]
        if hs:
            hf = [r["active_fraction"] for r in hs]
            axes[0].plot(hf, [r["healed"]["cos_mean"] for r in hs], "*-", color=color, ms=10, label=f"healed E={E}")
            axes[1].plot(hf, [r["healed"]["nn_agreement"] for r in hs], "*-", color=color, ms=10,
                         label=f"healed E={E}")
    up = [r for r in result["rows"] if r["pass"] == "upcycle"]
    if up and all(kern in r.get("time_ratio", {}) for r in up):
        axes[2].plot([r["active_fraction"] for r in up], [r["time_ratio"][kern] for r in up], "k^--",
                     label="upcycle E=8 (at init = dense)")
    for ax, title in zip(axes, ["cosine to dense (— mean, ··· worst; × no refit; ★ healed)",
                                "nearest-neighbour agreement (× no refit)",
                                f"FFN time MoE / dense ({kern}, {result['tokens_timed']} tokens; — 1 thread, -- all cores)"]):
        ax.set_xlabel("fraction of FFN neurons active per token")
        ax.set_title(title, fontsize=10)
        ax.axvline(0.25, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(0.99, color="red", lw=0.5)
    axes[1].axhline(0.95, color="red", lw=0.5)
    axes[2].axhline(1.0, color="red", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--experts", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="E values (default 4,8,16,32; 4,8 with --quick)")
    p.add_argument("--method", default="cluster", choices=moefy.moefy_partition.METHODS)
    p.add_argument("--router", default="linear", choices=moefy.moefy_router.ROUTERS)
    p.add_argument("--shared", type=int, default=0, help="always-on neurons (rounded up to whole experts)")
    p.add_argument("--upcycle-k", type=lambda s: [int(v) for v in s.split(",") if v], default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heal", type=int, default=0, metavar="STEPS",
                   help="also heal the 12.5-50%%-active points of --heal-experts for up to STEPS steps")
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="only these top-k values (default: every k for E ≤ 16, a few with --quick)")
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=None,
                   help="only the k = fraction × E of these active fractions (e.g. 0.125,0.25,0.5)")
    p.add_argument("--heal-experts", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    p.add_argument("--heal-params", default="all", choices=moefy_heal.PARAMS)
    p.add_argument("--heal-lr", type=float, default=None)
    p.add_argument("--heal-routers", action="store_true", help="train the routers too (straight-through gates)")
    p.add_argument("--no-time", dest="time", action="store_false",
                   help="quality only (healing on a shared machine); take the times from a --time-from run")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="torch times only (no ONNX artifacts of the model and of layer 0's FFN)")
    p.add_argument("--time-from", type=Path, default=None,
                   help="curve.json of a timing run (--heal 0, quiet machine): its times fill this table")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="no run: the rows of these curve.json files (e.g. one run per E) into one table and plot")
    p.add_argument("--quick", action="store_true", help="a few k per E (and E in {4, 8} unless --experts)")
    args = p.parse_args(argv)
    if args.combine:
        parts = [json.loads(f.read_text()) for f in args.combine]
        result = {**parts[0], "rows": [r for part in parts for r in part["rows"]]}
        if args.time_from:                  # e.g. the healed quality run + a timing run on a quiet machine
            result = merge_times(result, json.loads(args.time_from.read_text()))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "curve.json").write_text(json.dumps(result, indent=1))
        (args.out / "curve.md").write_text(table(result))
        plot(result, args.out / "curve.png")
        print(table(result))
        return
    args.experts = args.experts or ([4, 8] if args.quick else [4, 8, 16, 32])
    fits = sum(len(ks_for(E, args.quick)) for E in args.experts)
    print(f"moefy_curve: {len(args.experts)} partitions, {fits} (E, k) fits, each scored on the held-out corpus; "
          + ("about 10 min on a 2-core CPU" if args.quick else
             "about 45 min on a 2-core CPU (--quick: E in 4, 8 and a few k, about 10 min)"),
          file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.partial = args.out / "rows.partial.json"
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    if args.time_from:
        result = merge_times(result, json.loads(args.time_from.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(result, indent=1))
    (args.out / "curve.md").write_text(table(result))
    plot(result, args.out / "curve.png")
    print(table(result))


if __name__ == "__main__":
    main()
