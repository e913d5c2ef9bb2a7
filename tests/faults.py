"""Fault injection: perturb one expert's weights inside a lowered artifact, per backend (its own format)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _bump(a: np.ndarray, expert: int, scale: float) -> np.ndarray:
    a = np.array(a, copy=True)
    a[expert] += scale * float(np.abs(a).mean() + 1e-3)
    return a


def perturb_one_expert(d: Path, backend: str, expert: int = 5, layer: int = 0, scale: float = 2.0) -> str:
    """Add `scale`·mean|w| to expert `expert`'s w_in in MoE layer `layer` of the artifact files in `d`
    (as a lowering bug would write them; the TVM meta checksums are updated too). Returns the tensor name."""
    d = Path(d)
    if backend == "torch":
        import torch
        import moecc.ops  # noqa: F401
        ep = torch.export.load(d / "model.pt2")
        name = next(k for k in ep.state_dict if f"moecc_{layer}" in k and k.endswith("w_in"))
        ep.state_dict[name].data.copy_(torch.from_numpy(_bump(ep.state_dict[name].detach().numpy(), expert, scale)))
        torch.export.save(ep, d / "model.pt2")
    elif backend == "onnx":
        import onnx
        from onnx import numpy_helper
        model = onnx.load(d / "model.onnx")
        init = next(i for i in model.graph.initializer if i.name == f"moecc_{layer}.w_in")
        name = init.name
        init.CopyFrom(numpy_helper.from_array(_bump(numpy_helper.to_array(init), expert, scale), name))
        onnx.save(model, d / "model.onnx")
    elif backend == "tvm":
        from moecc.backends.tvm import runtime
        params = dict(np.load(d / "params.npz"))
        name = next(k for k in params if f"moecc_{layer}" in k and k.endswith("w_in"))
        params[name] = _bump(params[name], expert, scale)
        np.savez(d / "params.npz", **params)
        meta = json.loads((d / runtime.META).read_text())
        meta["sha256"]["params.npz"] = runtime.sha256(d / "params.npz")
        (d / runtime.META).write_text(json.dumps(meta))
    else:
        raise ValueError(backend)
    return name
