"""`moecc bench`: every torch kernel against the hardware limit and the alternatives, in ONE run.

    shapes (Mixtral-, DeepSeek-, Switch-like) × T (1, 8, 64, 512, 2048) ×
      moecc:<kernel> (each whose checker accepts T) + moecc:auto (run-time dispatch): what a torch
                      artifact runs per layer: router Linear, routing (ATen, moecc.routing.route),
                      the experts kernel, the shared expert (ATen, moecc.ops.shared_expert)
      ref:dense_gemm  a dense GEMM doing the same active FLOPs (the prefill roofline, measured)
      ref:stream      reading the bytes of the experts the tokens hit, once (the decode roofline)
      ort:fused       onnxruntime's com.microsoft::MoE on the same weights
      hf:eager, hf:grouped_mm   the transformers 5.x MoE block, both experts implementations
      tvm:<kernel>    moecc's TVM backend kernels (tvm=True; compiled once per shape)
    at 1 thread and at every core (`run_threads`): each run measures its own square-matmul FLOP/s and
    stream time at its thread count, so the limit is the limit at that thread count;
    → limit = max(active FLOPs / square-matmul FLOP/s, ref:stream) per point; median of repeats;
      rounds interleave the implementations so machine contention hits all of them alike.

`run_bench(...)` returns the results dict; `report.write` writes the table, JSON and PNG.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from moecc import ops
from moecc.backends.torch import kernels, machine, select
from moecc.ops import moe_reference
from moecc.routing import route
from moecc.spec import MoESpec, RouterSpec

from . import alternatives as bench_alts

SHAPES = {
    "mixtral-like": MoESpec(8, 1024, 3584, "swiglu", RouterSpec(top_k=2), name="mixtral-like"),
    "deepseek-like": MoESpec(64, 1024, 512, "swiglu", RouterSpec(top_k=6, renormalize=False),
                             shared_ffn=512, name="deepseek-like"),
    "switch-like": MoESpec(16, 1024, 4096, "relu", RouterSpec(top_k=1, renormalize=False), name="switch-like"),
}
TOKENS = (1, 8, 64, 512, 2048)
QUICK = {"tokens": (1, 64, 512), "repeats": 3}
SETTLE_S = 0.05                        # pause before each timed call (see _time)
FULL_REPEATS = 5
SLOW = 8.0            # an implementation this many times slower than the best kernel is timed once


def make_weights(spec: MoESpec, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    E, H, R, Fw = spec.num_experts, spec.hidden, spec.in_rows, spec.ffn
    rnd = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5   # noqa: E731
    w = {"router": rnd(E, H), "w_in": rnd(E, R, H), "w_out": rnd(E, H, Fw)}
    if spec.shared_ffn:
        w["shared_w_in"] = rnd(spec.shared_in_rows, H)
        w["shared_w_out"] = rnd(H, spec.shared_ffn)
    return w


def active_flops(spec: MoESpec, tokens: int) -> float:
    H, R, Fw = spec.hidden, spec.in_rows, spec.ffn
    per_token = spec.top_k * 2 * (H * R + Fw * H) + 2 * spec.num_experts * H
    if spec.shared_ffn:
        per_token += 2 * (H * spec.shared_in_rows + spec.shared_ffn * H)
    return float(tokens * per_token)


def square_gemm_flops(n: int = 2048, repeats: int = 5, clock=time.perf_counter) -> float:
    """The faster library's FLOP/s on an n x n x n matmul: MKL (a @ b) or oneDNN on a reordered weight
    (packed.dnn_linear; 2x MKL on an AVX-512 AMD EPYC, where MKL keeps to AVX2): the limit is the
    machine's, not one library's."""
    from moecc.backends.torch import packed
    with torch.inference_mode(False):          # ordinary tensors: packed.py reorders no inference tensor
        a, b = torch.randn(n, n), torch.randn(n, n)
    runs = [lambda: a @ b]
    if packed.available("dnn"):
        runs.append(lambda: packed.dnn_linear(a, b))
    best = float("inf")
    for run in runs:
        run()
        times = []
        for _ in range(repeats):
            t0 = clock()
            run()
            times.append(clock() - t0)
        best = min(best, min(times))               # what the hardware does (machine.best_time's rule)
    return 2 * n ** 3 / best


def _implementations(spec: MoESpec, w: dict, x: torch.Tensor, alts: dict) -> tuple[dict, list, dict]:
    """name -> zero-argument callable computing the layer (router Linear included) on x."""
    T = x.shape[0]
    sw_in, sw_out = w.get("shared_w_in"), w.get("shared_w_out")

    def layer(kernel: str):
        def run():                     # what a decomposed torch artifact runs for the layer
            xt, weights, ids = ops.routed(x, F.linear(x, w["router"]), None, None, spec)   # [T, H], [T, k]
            y = select.run_experts(kernel, xt, ids, weights, w["w_in"], w["w_out"], None, None, spec=spec)
            return y if sw_in is None else y + ops.shared_expert(xt, sw_in, sw_out, None, spec)
        return run
    impls, skipped = {}, []
    for name, k in kernels.KERNELS.items():
        verdict = k.checker(spec, T)
        if verdict is True:
            impls[f"moecc:{name}"] = layer(name)
        else:
            skipped.append(f"moecc:{name}: {verdict}")
    impls["moecc:auto"] = layer(select.AUTO)
    xr = x.repeat_interleave(spec.top_k, 0)                                  # [T*k, H]
    w1, w2 = w["w_in"][0], w["w_out"][0]

    def dense_gemm():                  # the same GEMM FLOPs on one expert's weights (no routing)
        y = F.linear(F.linear(xr, w1)[:, : spec.ffn], w2)
        if sw_in is not None:
            F.linear(F.linear(x, sw_in)[:, : spec.shared_ffn], sw_out)
        return y
    impls["ref:dense_gemm"] = dense_gemm
    ids = route(F.linear(x, w["router"]), spec)[1]
    hit = sorted(int(e) for e in ids.unique() if e >= 0)
    streamed = [w["router"]] + [t for e in hit for t in (w["w_in"][e], w["w_out"][e])]
    streamed += [w[n] for n in ("shared_w_in", "shared_w_out") if n in w]
    impls["ref:stream"] = lambda: [t.sum() for t in streamed]
    xn = x.numpy()
    for name, fn in alts.items():
        if isinstance(fn, tuple):                      # (run on numpy, checker(T)): TVM kernels
            fn, check = fn
            verdict = check(T)
            if verdict is not True:
                skipped.append(f"{name}: {verdict}")
                continue
        impls[name] = (lambda fn=fn: fn(xn)) if name.startswith(("ort:", "tvm:")) else (lambda fn=fn: fn(x))
    return impls, skipped, {"experts_hit": len(hit), "bytes_hit": sum(t.numel() * 4 for t in streamed)}


def _check(impls: dict, reference: torch.Tensor) -> dict:
    """Max abs error of every implementation's output against moe_reference (refs excluded)."""
    errs = {}
    for name, fn in impls.items():
        if not name.startswith("ref:"):
            y = fn()
            y = torch.from_numpy(y) if not isinstance(y, torch.Tensor) else y
            errs[name] = float((y.reshape(reference.shape) - reference).abs().max())
    return errs


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(impls: dict, repeats: int, tick, clock=time.perf_counter) -> dict:
    """Interleaved rounds (order rotated per round), each call after a SETTLE_S pause; median seconds
    per implementation. The pause lets the thread pools of the runtime timed before (onnxruntime's and
    TVM's spin after a call) go idle: measured here, a torch kernel timed right after an ORT call at
    2 threads ran 1.4x slower (88 -> 125 ms at mixtral-like T=512)."""
    names = list(impls)
    first = {}
    for n in names:                                    # warm-up round, also finds the slow ones
        t0 = clock()
        impls[n]()
        first[n] = clock() - t0
    best = min(v for n, v in first.items() if n.startswith("moecc:"))
    slow = {n for n in names if first[n] > SLOW * best and first[n] > 0.5}
    times = {n: [] for n in names}
    for r in range(repeats):
        tick()
        for n in names[r % len(names):] + names[: r % len(names)]:
            if n in slow and times[n]:
                continue
            time.sleep(SETTLE_S)
            t0 = clock()
            impls[n]()
            times[n].append(clock() - t0)
    return {n: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "runs": len(v)}
            for n, v in times.items()}


def run_bench(shapes: dict | None = None, tokens=TOKENS, repeats: int = FULL_REPEATS, threads: int | None = None,
              alternatives: bool = True, progress: bool = True, seed: int = 0, clock: str = "wall",
              tvm: bool = False) -> dict:
    """Measure the grid; the results dict (see `bench_report.write`).

    clock="cpu" times process CPU seconds instead of wall seconds: on a machine shared with other
    jobs it ignores the time this process waits descheduled (honest only with threads=1, where no
    thread spins waiting for another)."""
    from tqdm import tqdm
    shapes = SHAPES if shapes is None else shapes
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    if tvm:
        bench_alts.tvm_threads(threads)
    consts = machine.remeasure()                       # fresh constants: the cost model's choices below
    results = {"threads": threads, "clock": clock, "load_before": os.getloadavg(),
               "machine": machine.machine_key(), "constants": consts,
               "versions": _versions(), "repeats": repeats, "settle_ms": SETTLE_S * 1e3, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "shapes": {}, "points": []}
    bar = tqdm(total=len(shapes) * len(tokens) * (repeats + 2), disable=not progress, desc="moecc bench")
    with torch.inference_mode():
        for sname, spec in shapes.items():
            with torch.inference_mode(False):          # ordinary tensors, as a loaded program's weights:
                w = make_weights(spec, seed)           # (packed.py keeps packs only of version-tracked ones)
            # before anything of TVM's is built: its tuning left the first shape's rate at 203 GFLOP/s, not ~450
            peak = square_gemm_flops(512 if spec.hidden < 512 else 2048, clock=CLOCKS[clock])
            alts, alt_skips = {}, []
            if alternatives:
                for name, build in (("ort:fused", lambda: bench_alts.ort_fused(spec, w, threads)),
                                    ("hf:eager", lambda: bench_alts.hf_block(spec, w, "eager")),
                                    ("hf:grouped_mm", lambda: bench_alts.hf_block(spec, w, "grouped_mm"))):
                    made = build()
                    if isinstance(made, str):
                        alt_skips.append(f"{name}: {made}")
                    else:
                        alts[name] = made
            work = tempfile.mkdtemp(prefix="moecc-bench-tvm-") if tvm else None
            if tvm:
                made = bench_alts.tvm_kernels(spec, w, work)
                if isinstance(made, str):
                    alt_skips.append(f"tvm: {made}")
                else:
                    alts.update(made)
            results["shapes"][sname] = {"spec": spec.to_dict(), "gemm_flops": peak, "skipped": alt_skips}
            for T in tokens:
                bar.set_postfix_str(f"{sname} T={T}")
                x = torch.randn(T, spec.hidden, generator=torch.Generator().manual_seed(seed + T))
                impls, skipped, load = _implementations(spec, w, x, alts)
                ref = moe_reference(x, F.linear(x, w["router"]), w["w_in"], w["w_out"], None, None, None,
                                    w.get("shared_w_in"), w.get("shared_w_out"), None, None, spec)
                errors = _check(impls, ref)
                bar.update(1)
                times = _time(impls, repeats, lambda: bar.update(1), CLOCKS[clock])
                choice = select.choose(spec, T)
                compute = active_flops(spec, T) / peak * 1e3
                memory = times["ref:stream"]["median_ms"]
                results["points"].append({
                    "shape": sname, "tokens": T, "times": times, "errors": errors, "skipped": skipped, **load,
                    "chosen": f"moecc:{choice.kernel}", "chosen_reason": choice.reason, "rejected": choice.rejected,
                    "compute_limit_ms": compute, "memory_limit_ms": memory, "limit_ms": max(compute, memory)})
                bar.update(1)
            del w, alts
            if work:
                shutil.rmtree(work, ignore_errors=True)
    bar.close()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["load_after"] = os.getloadavg()
    return results


def thread_counts(threads: int | None = None) -> tuple[int, ...]:
    """The thread counts of one `moecc bench`: 1 and every core (os.cpu_count()); `threads` pins one."""
    if threads:
        return (threads,)
    cores = os.cpu_count() or 1
    return (1,) if cores == 1 else (1, cores)


def run_threads(shapes: dict | None = None, tokens=TOKENS, repeats: int = FULL_REPEATS, counts=(1,),
                **kw) -> dict:
    """The grid once per thread count, in one process: {"runs": [results per count], "headline": count}.
    Each run measures its own square-GEMM and stream rates at its thread count, so its limit is the
    limit at that many threads; the last (most threads) is the headline."""
    before = torch.get_num_threads()
    try:
        runs = [run_bench(shapes, tokens, repeats, n, **kw) for n in counts]
    finally:
        torch.set_num_threads(before)
    return {"runs": runs, "headline": runs[-1]["threads"]}


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "onnxruntime", "transformers", "moecc"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
