"""Shared by the ONNX backend tests: MoE layers with weights at a scale where routing and numerics
matter, many layers side by side in one model (one export covers them all), export + lower + run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from moecc.backends.onnx import lower as onnx_lower
from moecc.backends.onnx.runtime import run_onnx
from moecc.spec import MoESpec, RouterSpec
from random_layers import Side, randomized  # noqa: F401  (shared with the other backends' tests)

H, F = 8, 6
AUTO = torch.export.Dim.AUTO


def spec(name: str, E: int = 4, act: str = "relu", **router) -> MoESpec:
    kw = {k: router.pop(k) for k in ("expert_bias", "interleaved", "act_limit", "act_alpha",
                                     "shared_ffn", "shared_gated") if k in router}
    return MoESpec(E, H, F, act, RouterSpec(**router), name=name, **kw).validate()


def inputs(B: int, S: int, seed: int = 0, vocab: int = 1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, generator=g), torch.randint(0, vocab, (B, S), generator=g)


def export(model: nn.Module, example: tuple) -> torch.export.ExportedProgram:
    dyn = tuple({i: AUTO for i in range(t.dim() - (1 if t.is_floating_point() else 0))} for t in example)
    return torch.export.export(model.eval(), example, dynamic_shapes=dyn)


def lower(model: nn.Module, example: tuple, out: Path, **options):
    out.mkdir(parents=True, exist_ok=True)
    return onnx_lower.lower(export(model, example), out, options), out / "model.onnx"


def run(path: Path, args: tuple) -> list[np.ndarray]:
    return run_onnx(path, [a.numpy() for a in args], threads=1)


def eager(model: nn.Module, args: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*args)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def op_types(path: Path) -> list[tuple[str, str]]:
    import onnx
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]
