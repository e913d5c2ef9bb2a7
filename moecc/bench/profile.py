"""Where the time goes at the points `moecc bench` missed: a torch.profiler breakdown per point.

    misses(results) -> [(threads, shape, T, best kernel, best/limit)]     from bench.json's rows
    profile_point(spec, T, kernel, threads) -> {category: ms, "gemm_gflops": …, "ops": top ops}
    markdown(profiles) -> str                                             the table bench_profile.md holds

Each point runs the layer exactly as the bench times it (router Linear, routing, the experts kernel,
the shared expert) under torch.profiler (CPU), `repeats` calls after a warm-up, and sums each ATen
op's self CPU time into a category:

    gemm     mm / addmm / bmm / linear / matmul / _grouped_mm / mkl packed linear  (the FLOPs)
    gather   index / index_select / gather / scatter / index_add / sort / bincount / cumsum / take
             (moving rows to and from their experts)
    routing  softmax / sigmoid / topk / the router's reductions
    act      silu / gelu / relu / mul / add / … elementwise
    alloc    empty / zeros / cat / stack / copy / contiguous / to   (memory traffic that is not GEMM)
    other    every other ATen op
    untracked  the wall time no ATen op accounts for: moecc's own C kernel (backends/torch/skinny.py,
             the fused small-row experts path, invisible to torch.profiler), Python and dispatch; at
             2+ threads also the ops of parallel.py's expert threads, which this profile sees few of
             (mixtral-like T=512, 2 threads: 0.2 ms of mm recorded in a 64 ms call)

`gemm_gflops` = the point's active FLOPs / GEMM time: against the square-matmul rate of the same run
it says whether the GEMMs themselves are slow (few rows per expert) or the time is outside them.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moecc import ops
from moecc.backends.torch import select
from moecc.spec import MoESpec

CATEGORIES = {
    "gemm": ("mm", "addmm", "bmm", "linear", "matmul", "_grouped_mm", "_mkl_linear", "baddbmm",
             "_linear_pointwise"),                 # oneDNN (torch.dnn_gemm, gemm.linear's dnn form)
    "gather": ("index", "index_select", "gather", "scatter", "scatter_add", "index_add", "index_put",
               "sort", "argsort", "bincount", "cumsum", "take", "nonzero", "repeat_interleave",
               "masked_select", "where", "unique", "searchsorted", "histc"),
    "routing": ("softmax", "_softmax", "sigmoid", "topk", "log_softmax", "max", "sum", "div"),
    "act": ("silu", "gelu", "relu", "mul", "add", "sub", "neg", "exp", "clamp", "clamp_min", "tanh"),
    "alloc": ("empty", "zeros", "zero", "fill", "cat", "stack", "copy_", "contiguous", "to",
              "_to_copy", "clone", "new_zeros", "empty_strided", "resize", "full"),
}


def category(op: str) -> str:
    """'aten::index_select' -> 'gather' (unknown ops: 'other')."""
    name = op.split("::")[-1].rstrip("_") or op          # in-place variants: their op's category
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "other"


def misses(results: dict, report) -> list[dict]:
    """Every point of every thread count whose best torch kernel missed its limit target."""
    out = []
    for run in results.get("runs", [results]):
        for r in report.rows(run):
            if not r.get("ok_limit", True):
                out.append({"threads": run["threads"], "shape": r["shape"], "tokens": r["T"],
                            "kernel": r["best"].split(":", 1)[1], "best_over_limit": r["best_over_limit"]})
    return out


def layer(spec: MoESpec, w: dict, x: torch.Tensor, kernel: str):
    """The callable the bench times for `kernel` (see moecc.bench.grid._implementations)."""
    sw_in, sw_out = w.get("shared_w_in"), w.get("shared_w_out")

    def run():
        xt, weights, ids = ops.routed(x, F.linear(x, w["router"]), None, None, spec)
        y = select.run_experts(kernel, xt, ids, weights, w["w_in"], w["w_out"], None, None, spec=spec)
        return y if sw_in is None else y + ops.shared_expert(xt, sw_in, sw_out, None, spec)
    return run


def profile_point(spec: MoESpec, tokens: int, kernel: str, threads: int, repeats: int = 5,
                  seed: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .grid import active_flops, make_weights
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = make_weights(spec, seed)
        x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(seed + tokens))
        run = layer(spec, w, x, kernel)
        with torch.inference_mode():
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()            # the profiler's own start and stop left out
                for _ in range(repeats):
                    run()
                wall = (time.perf_counter() - t0) / repeats * 1e3
    finally:
        torch.set_num_threads(before)
    cats = dict.fromkeys(list(CATEGORIES) + ["other"], 0.0)
    ops_ms = {}
    for ev in prof.key_averages():
        if not ev.key.startswith(("aten::", "mkl::")):
            continue
        ms = ev.self_cpu_time_total / 1e3 / repeats
        cats[category(ev.key)] += ms
        ops_ms[ev.key] = ms
    cats["untracked"] = max(wall - sum(cats.values()), 0.0)
    top = sorted(ops_ms.items(), key=lambda kv: -kv[1])[:4]
    gemm = cats["gemm"]
    if cats["untracked"] > gemm:                     # the GEMMs ran in the C kernel: no ATen rate
        gemm = 0.0
    return {"wall_ms": wall, "categories": cats, "top_ops": top,
            "gemm_gflops": active_flops(spec, tokens) / (gemm * 1e-3) / 1e9 if gemm > 0 else None}


def run(results: dict, report, shapes: dict, repeats: int = 5, progress: bool = True) -> list[dict]:
    from tqdm import tqdm
    todo = misses(results, report)
    out = []
    for m in tqdm(todo, desc="profile misses", disable=not progress):
        p = profile_point(shapes[m["shape"]], m["tokens"], m["kernel"], m["threads"], repeats)
        out.append({**m, **p})
    return out


def markdown(profiles: list[dict], results: dict) -> str:
    rates = {(run["threads"], s): v["gemm_flops"] / 1e9
             for run in results.get("runs", [results]) for s, v in run["shapes"].items()}
    lines = ["# Where the time goes at the points `moecc bench` missed (torch.profiler, self CPU time per op)",
             "",
             "Categories: gemm (mm/addmm/linear/_grouped_mm/MKL packed), gather (index/sort/scatter/"
             "bincount: rows to and from experts), routing (softmax/topk/reductions), act (elementwise), "
             "alloc (cat/copy/empty), other ATen ops, untracked (wall time no ATen op accounts for: moecc's "
             "C kernel for small-row experts, backends/torch/skinny.py, Python, dispatch). % of the wall "
             "time per call under the profiler. GEMM rate = active FLOPs / GEMM time, against the square-matmul rate of the "
             "same bench run.", "",
             "| threads | shape | T | kernel | best/limit | wall ms | gemm | gather | routing | act | alloc |"
             " other | untracked | ATen GEMM GFLOP/s (square) | top ops (ms) |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in profiles:
        c, wall = p["categories"], p["wall_ms"]
        pct = " | ".join(f"{100 * c[k] / wall:.0f}%" for k in list(CATEGORIES) + ["other", "untracked"])
        rate = f"{p['gemm_gflops']:.0f}" if p["gemm_gflops"] else "—"
        square = rates.get((p["threads"], p["shape"]))
        top = ", ".join(f"{k.split('::')[-1]} {v:.2f}" for k, v in p["top_ops"])
        lines.append(f"| {p['threads']} | {p['shape']} | {p['tokens']} | {p['kernel']} | "
                     f"{p['best_over_limit']:.2f} | {wall:.2f} | {pct} | {rate} ({square:.0f}) | {top} |")
    return "\n".join(lines) + "\n"
