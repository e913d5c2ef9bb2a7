"""Time moecc's ONNX artifact (run-time dispatch on the token count) against ORT's fused MoE op.

    python samples/onnx_dispatch_times.py [--out DIR] [--tokens 1,64,2048] [--repeats 7]

One MoE layer (Mixtral-like at a small width: E=8, H=512, F=1024, SwiGLU, softmax top-2), compiled
three times with `moecc.compile(..., backend="onnx")`: the default (`auto`: the fused op behind an
If at decode, portable experts kernels above), `fused` (com.microsoft::MoE at every count: ORT's own
op) and `portable` (standard ONNX only). Each artifact runs in onnxruntime on one thread (on the
calling thread: process CPU time measures it, robust on a shared machine); median CPU ms of
`--repeats` interleaved runs per token count. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import moecc
from moecc.artifact import read_manifest
from moecc.backends.onnx.runtime import runner, session
from moecc.nn import MoE
from moecc.spec import MoESpec, RouterSpec

SPEC = MoESpec(8, 512, 1024, "swiglu", RouterSpec(top_k=2), name="moe")
MODES = ("auto", "fused", "portable")


def build() -> MoE:
    torch.manual_seed(0)
    layer = MoE(SPEC).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    return layer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokens", default="1,64,2048")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="moecc-onnx-times-"))
    layer = build()
    runs, kernels = {}, {}
    for mode in MODES:
        path = moecc.compile(layer, (torch.randn(2, 16, SPEC.hidden),), backend="onnx", out=out / mode,
                             options={"onnx_moe": mode}, force=True, progress=False, source="onnx_dispatch_times")
        kernels[mode] = read_manifest(path)["backend"]["kernels"][0]["kernel"]
        runs[mode] = runner(session(path / "model.onnx", threads=1))
    rows = []
    for T in tokens:
        x = np.random.default_rng(T).standard_normal((1, T, SPEC.hidden)).astype(np.float32)
        with torch.no_grad():
            want = layer(torch.from_numpy(x)).numpy()
        times = {m: [] for m in MODES}
        for m in MODES:                                  # warm-up + check
            err = float(np.abs(runs[m]([x])[0] - want).max())
            assert err < 1e-3, f"{m} at T={T}: max abs error {err}"
        for r in range(args.repeats):
            for m in MODES[r % 3:] + MODES[:r % 3]:
                t0 = time.process_time()
                runs[m]([x])
                times[m].append(time.process_time() - t0)
        rows.append((T, {m: statistics.median(v) * 1e3 for m, v in times.items()}))
    print(f"kernels: {kernels}")
    print("| T | moecc auto (If) ms | ORT fused op ms | portable ms | auto / fused |")
    print("|---:|---:|---:|---:|---:|")
    for T, t in rows:
        print(f"| {T} | {t['auto']:.3f} | {t['fused']:.3f} | {t['portable']:.3f} | {t['auto'] / t['fused']:.2f} |")


if __name__ == "__main__":
    main()
