"""moefy_curve's ONNX columns: a MoEfied model's ONNX artifacts timed against the dense model's.

    model(base, gm, batches)  the whole model, lowered by moecc's ONNX backend (MoEfied: its moe nodes as
                              the backend chooses for them; dense: the captured model as it is), run
                              by onnxruntime on the held-out sentence batches
    ffn(gm, dense_fn, x)      layer 0 alone: the dense FFN (Linear-GELU-Linear) and the MoEfied layer
                              (router + moe node, `moecc.nn.from_graph`) compiled to ONNX, on x [T, H]
    → {"onnx 1 thread": MoE / dense, "onnx N threads": MoE / dense}: 1 thread in thread CPU time
      (onnxruntime's one intra-op thread is the caller's), all cores in wall time; fastest of the
      repeats, dense and MoE interleaved so both see the same machine.
Each artifact is checked first against the torch graph it came from (model: here, 1e-4 of the output's
scale; ffn: moecc.compile's own verification).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moecc import backends
from moecc.backends.onnx.runtime import runner, session
from moecc.nn import from_graph

TOL = 1e-4


def _lower(captured, out: Path) -> Path:
    out.mkdir(parents=True)
    backends.get("onnx").lower(captured.export(), out, {})
    return out / "model.onnx"


def _numpy(batch) -> list[np.ndarray]:
    return [b.numpy() for b in batch]


def _check(run, gm, batch, what: str) -> None:
    with torch.no_grad():
        want = gm(*batch)
    want = want[0] if isinstance(want, (tuple, list)) else want
    got = run(_numpy(batch))[0]
    err = float(np.abs(got - want.numpy()).max())
    if not err <= TOL * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"{what}: ONNX artifact differs from its torch graph by {err:.3g}")


def _ratio(runs: dict, feeds: list, repeats: int, clock) -> float:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t = clock()
            for f in feeds:
                run(f)
            best[name] = min(best[name], clock() - t)
    return round(best["moe"] / best["dense"], 3)


def _pair(paths: dict, feeds: list, repeats: int) -> dict:
    threads = os.cpu_count() or 1
    out = {}
    for label, n, clock in (("onnx 1 thread", 1, time.thread_time),
                            (f"onnx {threads} threads", threads, time.perf_counter)):
        runs = {k: runner(session(p, threads=n)) for k, p in paths.items()}
        for run in runs.values():
            for f in feeds:
                run(f)                                            # warm-up
        out[label] = _ratio(runs, feeds, repeats, clock)
    return out


def model(base, gm, batches, repeats: int, cache: dict) -> dict:
    """Whole model, MoEfied / dense, on the held-out batches."""
    tmp = Path(cache.setdefault("tmp", tempfile.mkdtemp(prefix="moefy-onnx-")))
    if "dense_model" not in cache:
        cache["dense_model"] = path = _lower(base, tmp / "dense")
        _check(runner(session(path, threads=1)), base.gm, batches[0], "dense model")
    moe_dir = tmp / f"moe{len(os.listdir(tmp))}"
    path = _lower(dataclasses.replace(base, gm=gm), moe_dir)
    _check(runner(session(path, threads=1)), gm, batches[0], "MoEfied model")
    return _pair({"dense": cache["dense_model"], "moe": path}, [_numpy(b) for b in batches], repeats)


class _FFN(torch.nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.up, self.down = torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.Linear(w2.shape[1], w2.shape[0])
        with torch.no_grad():
            self.up.weight.copy_(w1), self.up.bias.copy_(b1), self.down.weight.copy_(w2), self.down.bias.copy_(b2)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def ffn(gm, dense_weights: tuple, x: torch.Tensor, repeats: int, cache: dict) -> dict:
    """Layer 0's FFN alone, MoEfied / dense, on x [T, H] (one batch of T tokens)."""
    import moecc
    tmp = Path(cache.setdefault("tmp", tempfile.mkdtemp(prefix="moefy-onnx-")))
    layer = next(iter(from_graph(gm).values())).eval()
    feed = (x.unsqueeze(0),)
    paths = {}
    for name, module in (("dense", _FFN(*dense_weights).eval()), ("moe", layer)):
        if name == "dense" and "dense_ffn" in cache:
            paths[name] = cache["dense_ffn"]
            continue
        out = moecc.compile(module, feed, backend="onnx", out=tmp / f"ffn-{name}{len(os.listdir(tmp))}",
                            force=True, progress=False, source=f"moefy_curve layer 0 {name}")
        paths[name] = out / "model.onnx"                  # (compile verified it against the module)
    cache["dense_ffn"] = paths["dense"]
    return _pair(paths, [[feed[0].numpy()]], repeats)
