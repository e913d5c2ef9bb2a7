"""The ONNX backend's kernels for `moecc::moe`, each a checker, a cost and an emitter; `choose` picks.

    onnx.dense_masked   every expert on every token, combined by a dense [T, E] weight matrix
    onnx.gather         per expert: Gather its routed tokens, MatMul, ScatterND(add) (the reference loop)
    ort.moe_fused       onnxruntime's com.microsoft::MoE, only where it computes exactly the same

    checker(spec, shapes) -> True | reason      shapes: {arg name: (shape with None for dynamic dims, dtype)}
    cost(spec, tokens) -> estimated µs on one CPU core (a rough model: compute + per-node overhead)

Modes (`options["onnx_moe"]`): "portable" = cheapest portable kernel; "auto" = the fused op where
its checker passes, else the cheapest portable one; "fused" = the fused op for every layer, an
error naming the layer and the reason where it cannot. `options["onnx_kernel"]` forces one kernel.
Note (measured, see below): on one core the fused op beats the portable kernels at small T but is
2-4x slower than onnx.gather from a few hundred tokens on; "auto" still prefers it (exact + compact).
"""
from __future__ import annotations

from typing import Callable

from moecc.errors import MoeccError
from moecc.spec import MoESpec

from ..base import KernelChoice
from . import fused, portable

MODES = ("portable", "fused", "auto")
# Calibrated on one CPU core, onnxruntime 1.32, E=8 H=64 F=128 swiglu k=2, T = 1 .. 2048: dense_masked
# 57 / 122 / 453 / 3478 µs at T = 1 / 8 / 64 / 512; gather 81 / 106 / 197 / 931 µs (this model: 57 / 102 /
# 469 / 3405 and 86 / 97 / 189 / 923). The fused op measured 26 / 73 / 236 / 2322 µs, 20 ms at T = 2048.
FLOPS_PER_US = 6e4      # ~60 GFLOP/s: one core, fp32 GEMM
NODE_US = 2.0           # onnxruntime CPU per-node overhead


def _expert_flops(spec: MoESpec) -> float:
    return 2.0 * (spec.in_rows * spec.hidden + spec.hidden * spec.ffn)


def _routed_per_token(spec: MoESpec) -> float:
    r = spec.router
    if r.kind == "expert_choice":
        return r.capacity_factor or float(spec.top_k)
    return float(spec.top_k)


def _always(spec: MoESpec, shapes: dict) -> bool | str:
    return True


def _fused_checker(spec: MoESpec, shapes: dict) -> bool | str:
    dtype = shapes.get("x", (None, "float32"))[1]
    logits_shape = shapes.get("logits", (None, None))[0]
    why = fused.refusal(spec, dtype, None if not logits_shape else logits_shape[-1])
    return True if why is None else why


def _cost_dense(spec: MoESpec, tokens: int) -> float:
    return tokens * spec.num_experts * _expert_flops(spec) / FLOPS_PER_US + 25 * NODE_US


def _cost_gather(spec: MoESpec, tokens: int) -> float:
    return (tokens * _routed_per_token(spec) * _expert_flops(spec) / FLOPS_PER_US
            + (10 + 4 * spec.num_experts) * NODE_US)


def _cost_fused(spec: MoESpec, tokens: int) -> float:
    return 2 * tokens * spec.top_k * _expert_flops(spec) / FLOPS_PER_US + 5 * NODE_US


def _emit_portable(name: str) -> Callable:
    return lambda *args, spec: portable.moe(*args, spec=spec, kernel=name)


KERNELS: dict[str, dict] = {
    "onnx.dense_masked": dict(checker=_always, cost=_cost_dense, emit=_emit_portable("onnx.dense_masked"),
                              portable=True),
    "onnx.gather": dict(checker=_always, cost=_cost_gather, emit=_emit_portable("onnx.gather"), portable=True),
    "ort.moe_fused": dict(checker=_fused_checker, cost=_cost_fused, emit=fused.moe, portable=False),
}


def checker(name: str, spec: MoESpec, shapes: dict) -> bool | str:
    return KERNELS[name]["checker"](spec, shapes)


def cost(name: str, spec: MoESpec, tokens: int) -> float:
    return KERNELS[name]["cost"](spec, tokens)


def emit(name: str, *args, spec: MoESpec):
    """Emit the layer's ONNX graph (inside a torch.onnx translation) with kernel `name`."""
    return KERNELS[name]["emit"](*args, spec=spec)


def choose(spec: MoESpec, shapes: dict, mode: str = "auto", tokens: int = 64,
           force: str | None = None) -> KernelChoice:
    """The kernel for one layer, with the reason and why each other candidate was not taken."""
    layer = spec.name or "?"
    if mode not in MODES:
        raise MoeccError(f"unknown --onnx-moe {mode!r}; choose one of {', '.join(MODES)}")
    if force is not None and force not in KERNELS:
        raise MoeccError(f"unknown ONNX kernel {force!r}; choose one of {', '.join(KERNELS)}")
    ok = {n: checker(n, spec, shapes) for n in KERNELS}
    costs = {n: cost(n, spec, tokens) for n in KERNELS}
    rejected = {n: str(why) for n, why in ok.items() if why is not True}
    if force is not None:
        if ok[force] is not True:
            raise MoeccError(f"MoE layer {layer}: kernel {force} cannot run it: {ok[force]}")
        return KernelChoice(layer, force, "forced by options['onnx_kernel']",
                            {n: rejected.get(n, "not forced") for n in KERNELS if n != force})
    if mode != "portable" and ok["ort.moe_fused"] is True:
        return KernelChoice(layer, "ort.moe_fused", "com.microsoft::MoE computes exactly this layer "
                            f"({spec.router.kind}, {spec.activation}, k={spec.top_k})",
                            {n: f"fused op preferred (--onnx-moe {mode})" for n in KERNELS if n != "ort.moe_fused"})
    if mode == "fused":
        raise MoeccError(f"MoE layer {layer}: the fused com.microsoft::MoE cannot run it: "
                         f"{ok['ort.moe_fused']}; use --onnx-moe auto (fused where exact, else portable)")
    if mode == "portable":
        rejected["ort.moe_fused"] = "not asked for (--onnx-moe portable)"
    portable_ok = sorted((costs[n], n) for n in KERNELS if KERNELS[n]["portable"] and ok[n] is True)
    best_cost, best = portable_ok[0]
    for c, n in portable_ok[1:]:
        rejected[n] = f"costlier at {tokens} tokens: est {c:.0f} µs vs {best_cost:.0f} µs"
    return KernelChoice(layer, best, f"cheapest portable kernel at {tokens} tokens (est {best_cost:.0f} µs)",
                        rejected)
