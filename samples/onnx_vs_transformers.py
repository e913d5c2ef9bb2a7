"""moecc's ONNX artifacts against transformers' own ONNX exporter, same model, same onnxruntime.

    python samples/onnx_vs_transformers.py                 # → samples/results/onnx_vs_transformers.md
    python samples/onnx_vs_transformers.py --quick         # one family, T = 1 and 64

Per family (small random causal LMs from samples/coverage_models.py, wider than the coverage ones so
the experts dominate: hidden 256, expert FFN 256, 8 experts, top-2, 2 layers, fp32): moecc's artifact
(capture, default passes, `--to onnx`: the run-time dispatch by token count) and transformers'
`OnnxExporter` (dynamic shapes, its default experts implementation), each saved as .onnx and run by a
plain onnxruntime InferenceSession with the same options, on input_ids [1, T]. Both are checked against
HF eager first (max abs error on the logits). Median of --repeats interleaved runs, CPU clock, at
1 thread and at every core; the table gives moecc / transformers (≤ 1.0: moecc no slower).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe")
TOKENS = (1, 8, 64, 512, 2048)
WIDE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, shared_expert_intermediate_size=256,
            moe_shared_expert_intermediate_size=256)


def build(family: str):
    sys.path.insert(0, str(HERE))
    import coverage_models as cm
    cfg = cm.config(family)
    over = {k: v for k, v in WIDE.items() if hasattr(cfg, k)}
    if hasattr(cfg, "kv_lora_rank"):
        over.pop("head_dim", None)
        over["num_key_value_heads"] = over["num_attention_heads"]
    return cm.build(family, **over)


def moecc_onnx(model, inputs, out: Path, options: dict | None = None) -> Path:
    from moecc import backends
    from moecc.api import transform
    from moecc.frontend import capture
    out.mkdir(parents=True)
    cap = capture(copy.deepcopy(model), inputs, source="bench")
    transform(cap, [])
    lowered = backends.get("onnx").lower(cap.export(), out, dict(options or {}))
    print(f"  moecc kernels: {sorted({k.kernel for k in lowered.kernels})}", file=sys.stderr)
    return next(out.glob("*.onnx"))


def hf_onnx(model, inputs, out: Path) -> Path:
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter
    model = copy.deepcopy(model)
    model.set_experts_implementation("grouped_mm")          # transformers' default, as a user exports
    exported = OnnxExporter().export(model, {"input_ids": inputs[0]}, config=OnnxConfig(dynamic=True))
    component = next(iter(exported.values())) if hasattr(exported, "values") else exported.components["model"]
    out.mkdir(parents=True)
    path = out / "model.onnx"
    OnnxExporter.save_program(component.program, path)
    return path


def session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feed(sess, ids):
    import numpy as np
    name = sess.get_inputs()[0].name
    return {name: ids.numpy().astype(np.int64)}


def logits(sess, ids):
    return sess.run(None, feed(sess, ids))[0]


def timed(sess, ids, repeats: int) -> list[float]:
    f = feed(sess, ids)
    sess.run(None, f)
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        sess.run(None, f)
        out.append(time.process_time() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "onnx_vs_transformers.md"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    families = args.families.split(",")[:1] if args.quick else args.families.split(",")
    tokens = (1, 64) if args.quick else tuple(int(t) for t in args.tokens.split(","))
    cores = os.cpu_count() or 1
    rows, started, load0 = [], time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg()[0]
    for fam in families:
        print(f"{fam}: building and exporting", file=sys.stderr)
        model, inputs = build(fam)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"moecc": moecc_onnx(model, inputs, Path(tmp) / "moecc"),
                     "transformers": hf_onnx(model, inputs, Path(tmp) / "hf")}
            check = torch.randint(2, 128, (1, 37), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                want = model(check).logits.numpy()
            errs = {k: float(np.abs(logits(session(p, 1), check) - want).max()) for k, p in paths.items()}
            for threads in sorted({1, cores}):
                sess = {k: session(p, threads) for k, p in paths.items()}
                for T in tokens:
                    ids = torch.randint(2, 128, (1, T), generator=torch.Generator().manual_seed(T))
                    times = {k: [] for k in sess}
                    for _ in range(args.repeats):                     # interleaved: drift hits both
                        for k, s in sess.items():
                            times[k] += timed(s, ids, 1)
                    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                    rows.append((fam, threads, T, med["moecc"], med["transformers"], med["moecc"] / med["transformers"],
                                 errs["moecc"], errs["transformers"]))
                    print(f"  {fam} threads={threads} T={T}: moecc {med['moecc']:.2f} ms, transformers "
                          f"{med['transformers']:.2f} ms, ratio {rows[-1][5]:.2f}", file=sys.stderr)
    worst = max(r[5] for r in rows)
    lines = ["# moecc ONNX artifacts vs transformers' ONNX exporter", "",
             f"Generated by `samples/onnx_vs_transformers.py` on {started}; CPU clock per call, median of "
             f"{args.repeats} interleaved runs; onnxruntime CPU, the same session options for both; load "
             f"average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (2-core machine). Models: "
             f"hidden 256, expert FFN 256, 8 experts, top-2, 2 layers, fp32.", "",
             f"- worst moecc / transformers: **{worst:.2f}** ({sum(r[5] <= 1.0 for r in rows)} of {len(rows)} "
             f"points ≤ 1.00)", "",
             "| family | threads | T | moecc ms | transformers ms | moecc / transformers | moecc err | transformers err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {f} | {th} | {T} | {a:.2f} | {b:.2f} | {r:.2f}{' ✗' if r > 1.0 else ''} | {ea:.1e} | {eb:.1e} |"
              for f, th, T, a, b, r, ea, eb in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
