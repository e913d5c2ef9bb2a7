"""TVM vs the torch reference vs ONNX Runtime on one MoE layer, at 1, 16 and 512 tokens, in ONE run.

    python samples/bench_tvm.py [--out out/bench_tvm.md] [--repeats 15] [--target llvm|host]

One `moecc.nn.MoE` layer (x [1, T, H] -> y) is exported once with a dynamic token dim; each TVM kernel
is compiled once (the same module then serves every T) and run through backends/tvm/runtime.py; the
torch reference is the eager module (moecc.ops.moe_reference); ONNX Runtime runs backends/onnx's
artifact (its kernel choice; skipped if that backend is missing). Every implementation is checked
against the reference, then timed in interleaved rounds (contention hits all alike); the table gives
the median CPU time of the process (time.process_time: robust on a shared machine) and the ratio to
the torch reference (< 1 = faster). Single thread everywhere.
`--target host` compiles for this CPU (AVX2/AVX-512 where present); `llvm` is TVM's generic x86-64.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moecc.ops  # noqa: E402,F401
from moecc import backends  # noqa: E402
from moecc.nn import MoE  # noqa: E402
from moecc.spec import MoESpec, RouterSpec  # noqa: E402

SHAPES = {
    "swiglu E8 k2 H512 F1024": MoESpec(8, 512, 1024, "swiglu", RouterSpec(top_k=2), name="swiglu-e8"),
    "gelu E32 k4 H256 F256": MoESpec(32, 256, 256, "gelu", RouterSpec(top_k=4), name="gelu-e32"),
    "gelu E4 k2 H256 F512 (tiny E)": MoESpec(4, 256, 512, "gelu", RouterSpec(top_k=2), name="gelu-e4"),
}
TOKENS = (1, 16, 512)
TVM_KERNELS = ("tvm.gather", "tvm.grouped_gemm", "tvm.dense_masked")


def layer(spec: MoESpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = MoE(spec, init_std=spec.hidden ** -0.5).eval()
    return m


def export(model: torch.nn.Module, spec: MoESpec) -> torch.export.ExportedProgram:
    x = torch.randn(1, 8, spec.hidden)
    return torch.export.export(model, (x,), dynamic_shapes=({1: torch.export.Dim.AUTO},))


def implementations(model, spec: MoESpec, target, work: Path) -> tuple[dict, dict, dict]:
    """{name: run(list[np]) -> list[np]}, {name: compile seconds}, {name: why skipped}."""
    def reference(inputs):
        with torch.inference_mode():
            return [model(torch.from_numpy(inputs[0])).numpy()]
    impls, compile_s, skipped = {"torch:reference": reference}, {}, {}
    for kernel in TVM_KERNELS:
        out = work / kernel
        out.mkdir()
        t0 = time.perf_counter()
        lowered = backends.get("tvm").lower(export(model, spec), out, {"kernel": kernel, "target": target})
        compile_s[kernel] = time.perf_counter() - t0
        compile_s[kernel + " (tvm.compile)"] = lowered.notes["compile_s"]
        impls[kernel] = backends.runtime("tvm").load(out, {})
    try:
        onnx_lower, onnx_runtime = backends.get("onnx"), backends.runtime("onnx")
    except ImportError as e:
        skipped["ort"] = f"backends/onnx not available ({e})"
        return impls, compile_s, skipped
    out = work / "onnx"
    out.mkdir()
    t0 = time.perf_counter()
    lowered = onnx_lower.lower(export(model, spec), out, {"tokens": 16})
    compile_s["ort"] = time.perf_counter() - t0
    impls[f"ort:{lowered.kernels[0].kernel}"] = onnx_runtime.load(out, {"files": lowered.files}, threads=1)
    return impls, compile_s, skipped


def median_ms(impls: dict, inputs: list, repeats: int) -> dict:
    for run in impls.values():                                            # warm up
        run(inputs)
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, run in impls.items():                                   # interleaved rounds
            t0 = time.process_time()
            run(inputs)
            times[name].append(time.process_time() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench(shapes: dict = SHAPES, tokens=TOKENS, repeats: int = 15, target="llvm") -> dict:
    torch.set_num_threads(1)
    from moecc.backends.tvm import kernels
    results = {"target": str(target), "repeats": repeats, "shapes": {}}
    for sname, spec in shapes.items():
        model = layer(spec)
        with tempfile.TemporaryDirectory() as work:
            impls, compile_s, skipped = implementations(model, spec, target, Path(work))
            rows = []
            for T in tokens:
                x = [np.random.default_rng(T).standard_normal((1, T, spec.hidden)).astype(np.float32)]
                ref = impls["torch:reference"](x)[0]
                errors = {n: float(np.abs(run(x)[0] - ref).max()) for n, run in impls.items()}
                ms = median_ms(impls, x, repeats)
                choice = kernels.select(spec, {"tokens": T})
                rows.append({"tokens": T, "ms": ms, "errors": errors, "tvm_choice": choice.kernel})
        results["shapes"][sname] = {"rows": rows, "compile_s": compile_s, "skipped": skipped}
    return results


def markdown(results: dict) -> str:
    lines = [f"# TVM vs torch vs ONNX Runtime, one MoE layer (1 thread, TVM target {results['target']}, "
             f"median of {results['repeats']})", ""]
    for sname, s in results["shapes"].items():
        names = list(s["rows"][0]["ms"])
        lines += [f"## {sname}", "", "| T | " + " | ".join(names) + " | TVM cost model picks |",
                  "|---" * (len(names) + 2) + "|"]
        for r in s["rows"]:
            base = r["ms"]["torch:reference"]
            cells = [f"{r['ms'][n]:.3f} ms (×{r['ms'][n] / base:.2f})" for n in names]
            lines.append(f"| {r['tokens']} | " + " | ".join(cells) + f" | {r['tvm_choice']} |")
        worst = max(e for r in s["rows"] for e in r["errors"].values())
        lines += ["", f"max abs error vs torch reference: {worst:.1e}; compile seconds: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in s["compile_s"].items())]
        lines += [f"skipped: {k}: {v}" for k, v in s["skipped"].items()] + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench_tvm.md")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--target", default="llvm", help="llvm (generic x86-64) or host (this CPU)")
    a = ap.parse_args(argv)
    text = markdown(bench(repeats=a.repeats, target=a.target))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
