"""Best TVM kernel / best torch kernel on the bench grid, before and after tuning, in ONE run (1 thread).

    python samples/bench_tvm_tuned.py [--out samples/results/tvm_tuned_grid.md] [--trials 6] [--repeats 3]
                                      [--shapes deepseek-like,...] [--tokens 1,8,...] [--note TEXT]

Shapes: moecc.bench.grid.SHAPES (Mixtral-, DeepSeek-, Switch-like), T = 1, 8, 64, 512, 2048. Per shape:
    torch:<kernel>        every torch experts kernel (router Linear, routing, experts, shared expert)
    tvm:<k>@llvm          today's TVM artifact: generic x86-64 target, default schedules (before)
    tvm:<k>@host+tuned    the host target (AVX2 here) with `tune_trials` (tune.py), tuned at the token
                          count of its regime: gather at T=8, grouped_gemm at T=512 (after)
    tvm:grouped@host      host target, default schedules (separates target from tuning)
for k in gather, grouped_gemm (dense_masked runs every expert on every token: never the best here).
Every implementation is checked against moe_reference; rounds interleave them (grid._time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moecc import backends  # noqa: E402
from moecc.bench import grid  # noqa: E402
from moecc.bench import alternatives as alts  # noqa: E402
from moecc.ops import moe_reference  # noqa: E402

VARIANTS = (("gather", "llvm", None, None), ("grouped_gemm", "llvm", None, None),
            ("grouped_gemm", "host", None, None), ("gather", "host", "tune", 8), ("grouped_gemm", "host", "tune", 512))


def tvm_variants(spec, w, work: Path, trials: int) -> tuple[dict, dict]:
    """{"tvm:<name>": (run(x np [T, H]) -> y, checker)}, {name: tuning notes}."""
    program = _program(spec, w)
    out, notes = {}, {}
    for kernel, target, tuned, tokens in VARIANTS:
        name = f"tvm:{kernel}@{target}" + ("+tuned" if tuned else "")
        d = work / name.replace(":", "_").replace("@", "_").replace("+", "_")
        d.mkdir(parents=True)
        options = {"kernel": f"tvm.{kernel}", "target": target}
        if tuned:
            options.update(tune_trials=trials, tokens=tokens)
        t0 = time.perf_counter()
        lowered = backends.get("tvm").lower(program, d, options)
        notes[name] = dict(lowered.notes.get("tuning") or {}, seconds=round(time.perf_counter() - t0, 1))
        run = backends.runtime("tvm").load(d, {})
        out[name] = (lambda x, run=run: run([x[None]])[0][0], lambda T: True)
    return out, notes


def _program(spec, w):
    from moecc.nn import MoE
    model = MoE(spec, init_std=0.0).eval()
    p = lambda t: torch.nn.Parameter(t, requires_grad=False)   # noqa: E731
    model.router.weight, model.w_in, model.w_out = p(w["router"]), p(w["w_in"]), p(w["w_out"])
    if spec.shared_ffn:
        model.shared_w_in, model.shared_w_out = p(w["shared_w_in"]), p(w["shared_w_out"])
    return torch.export.export(model, (torch.randn(1, 8, spec.hidden),), dynamic_shapes=({1: torch.export.Dim.AUTO},))


def run(tokens=grid.TOKENS, repeats: int = 3, trials: int = 6, shapes=tuple(grid.SHAPES), note: str = "") -> dict:
    torch.set_num_threads(1)
    alts.tvm_threads(1)
    res = {"repeats": repeats, "trials": trials, "shapes": {}, "started": time.strftime("%H:%M:%S"),
           "load_before": os.getloadavg(), "note": note}
    with torch.inference_mode():
        for sname, spec in ((n, grid.SHAPES[n]) for n in shapes):
            with torch.inference_mode(False):
                w = grid.make_weights(spec)
                with tempfile.TemporaryDirectory() as work:
                    tv, notes = tvm_variants(spec, w, Path(work), trials)
                    rows = []
                    for T in tokens:
                        x = torch.randn(T, spec.hidden, generator=torch.Generator().manual_seed(T))
                        impls, _, _ = grid._implementations(spec, w, x, tv)
                        impls = {n: f for n, f in impls.items() if not n.startswith("ref:") and n != "moecc:auto"}
                        ref = moe_reference(x, F.linear(x, w["router"]), w["w_in"], w["w_out"], None, None, None,
                                            w.get("shared_w_in"), w.get("shared_w_out"), None, None, spec)
                        errors = grid._check(impls, ref)
                        times = grid._time(impls, repeats, lambda: None, time.process_time)
                        rows.append({"tokens": T, "ms": {n: t["median_ms"] for n, t in times.items()},
                                     "errors": errors})
                        print(sname, T, {n: round(v["median_ms"], 2) for n, v in times.items()}, flush=True)
            res["shapes"][sname] = {"rows": rows, "tuning": notes}
    res["finished"], res["load_after"] = time.strftime("%H:%M:%S"), os.getloadavg()
    return res


def best(ms: dict, prefix: str, pick=lambda n: True) -> tuple[str, float]:
    name = min((n for n in ms if n.startswith(prefix) and pick(n)), key=ms.get)
    return name, ms[name]


def markdown(res: dict) -> str:
    lines = [f"# Best TVM kernel / best torch kernel, before and after tuning (1 thread, CPU time, median of "
             f"{res['repeats']}; {res['trials']} trials per tuned kernel)", "",
             f"Run {res['started']}–{res['finished']}, load average before {res['load_before'][0]:.2f}, "
             f"after {res['load_after'][0]:.2f}" + (f" ({res['note']})" if res.get("note") else "") + ".", "",
             "before = today's artifact (`--target llvm`, default schedules); after = `--target host "
             "--tune-trials N` (AVX2 + tuned knobs); `host` = host target, default schedules.", "",
             "| shape | T | best torch (ms) | best TVM before (ms) | ratio before | TVM host untuned | "
             "best TVM after (host, ms) | ratio after | ≤1.25 |", "|---|---|---|---|---|---|---|---|---|"]
    met = total = 0
    for sname, s in res["shapes"].items():
        for r in s["rows"]:
            ms = r["ms"]
            tn, tb = best(ms, "moecc:")
            bn, bb = best(ms, "tvm:", lambda n: n.endswith("@llvm"))
            hn, hb = best(ms, "tvm:", lambda n: n.endswith("@host"))
            an, ab = best(ms, "tvm:", lambda n: "@host" in n)
            ok = ab / tb <= 1.25
            met, total = met + ok, total + 1
            lines.append(f"| {sname} | {r['tokens']} | {tb:.2f} ({tn[6:]}) | {bb:.2f} ({bn[4:]}) | {bb / tb:.2f} | "
                         f"{hb:.2f} | {ab:.2f} ({an[4:]}) | {ab / tb:.2f} | {'met' if ok else 'missed'} |")
    worst = max(e for s in res["shapes"].values() for r in s["rows"] for e in r["errors"].values())
    lines += ["", f"Target ≤1.25 met at {met} of {total} points. Max abs error of any implementation vs "
              f"moe_reference: {worst:.1e}.", "", "Tuning (per shape and tuned artifact):", ""]
    for sname, s in res["shapes"].items():
        for n, t in s["tuning"].items():
            if t.get("workloads"):
                lines.append(f"- {sname} {n}: {t['trials']} trials measured, {t['reused']} reused, "
                             f"{t['workloads']} GEMM workloads, rows {t['rows']}, lower {t['seconds']} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="samples/results/tvm_tuned_grid.md")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--tokens", default=",".join(map(str, grid.TOKENS)))
    ap.add_argument("--shapes", default=",".join(grid.SHAPES), help=f"some of {', '.join(grid.SHAPES)}")
    ap.add_argument("--note", default="", help="how the machine was used during the run (goes into the header)")
    a = ap.parse_args(argv)
    shapes = [n.strip() for n in a.shapes.split(",") if n.strip()]
    unknown = [n for n in shapes if n not in grid.SHAPES]
    if unknown or not shapes:
        ap.error(f"--shapes: unknown {', '.join(unknown) or '(none given)'}; one or more of {', '.join(grid.SHAPES)}")
    res = run(tuple(int(t) for t in a.tokens.split(",")), a.repeats, a.trials, shapes, a.note)
    text = markdown(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    import json
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
