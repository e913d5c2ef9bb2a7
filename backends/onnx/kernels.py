"""The ONNX backend's kernels for an MoE layer, each a checker, a cost and an emitter; `choose` picks.

    onnx.dense_masked   experts node: every expert on every token, combined by a dense [T, E] weight matrix
    onnx.gather         experts node: per expert: Gather its routed tokens, MatMul, ScatterND(add)
    ort.moe_fused       the layer's moe node kept whole: onnxruntime's com.microsoft::MoE routes and
                        computes the experts, only where it computes exactly what moe_reference does

    checker(spec, shapes) -> True | reason      shapes: {arg name: (shape with None for dynamic dims, dtype)}
    cost(spec, tokens) -> estimated µs on one CPU core (a rough model: compute + per-node overhead)

Modes (`options["onnx_moe"]`): "portable" = cheapest portable kernel; "auto" = the cheapest kernel
whose checker passes, the fused op included, per token bucket: with no `options["tokens"]` given,
where the cheapest differs between buckets (e.g. the fused op at decode, onnx.gather at prefill),
each behind an ONNX If on the token count (kernel "onnx.by_tokens:ort.moe_fused@8:onnx.gather": the
fused op only ever for the smallest counts, as `torch.cond(T < 8, moe, route + experts)` in the
decomposed program (moecc.decompose), which torch.onnx exports as an If; between portable kernels,
dispatch.py's If inside the experts node); with `options["tokens"]`, the single cheapest
kernel at that count; "fused" = the fused op for every
layer, an error naming the layer and the reason where it cannot. `options["onnx_kernel"]` forces one.
Measured (1 thread, onnxruntime 1.32, CPU time, the bench's Mixtral-/DeepSeek-like layers; ms at
T = 1 / 8 / 64 / 512): fused 7.6 / 60 / 116 / 430 vs onnx.gather 8.4 / 32 / 70 / 353 (Mixtral-like),
3.8 / 28 / 84 / 240 vs 4.8 / 22 / 50 / 189 (DeepSeek-like): the fused op wins at decode only. At
T = 8 it re-reads an expert's weights per routed token (memory time ~2x gather's), from tens of tokens
its GEMMs run ~2x gather's compute time. The cost model below has both terms (compute, weight bytes).
"""

from __future__ import annotations

from moecc.errors import MoeccError
from moecc.routing import expected_load
from moecc.spec import MoESpec

from .. import buckets as token_buckets
from ..base import KernelChoice
from . import dispatch, fused, portable

MODES = ("portable", "fused", "auto")
BY_TOKENS = "onnx.by_tokens"        # "onnx.by_tokens:<k0>@<T1>:<k1>": k0 for T < T1, k1 from T1 on
SCAN = token_buckets.SCAN
# Calibrated on one CPU core, onnxruntime 1.32, E=8 H=64 F=128 swiglu k=2, T = 1 .. 2048: dense_masked
# 57 / 122 / 453 / 3478 µs at T = 1 / 8 / 64 / 512; gather 81 / 106 / 197 / 931 µs (this model: 57 / 102 /
# 469 / 3405 and 86 / 97 / 189 / 923). The fused op measured 26 / 73 / 236 / 2322 µs, 20 ms at T = 2048.
FLOPS_PER_US = 6e4      # ~60 GFLOP/s: one core, fp32 GEMM
BYTES_PER_US = 1.2e4    # ~12 GB/s: one core streaming expert weights from memory
NODE_US = 2.0           # onnxruntime CPU per-node overhead


def _expert_flops(spec: MoESpec) -> float:
    return 2.0 * (spec.in_rows * spec.hidden + spec.hidden * spec.ffn)


def _expert_bytes(spec: MoESpec) -> float:
    return 4.0 * (spec.in_rows * spec.hidden + spec.hidden * spec.ffn)


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
    return (max(tokens * spec.num_experts * _expert_flops(spec) / FLOPS_PER_US,
                spec.num_experts * _expert_bytes(spec) / BYTES_PER_US) + 25 * NODE_US)


def _cost_gather(spec: MoESpec, tokens: int) -> float:
    hit, _ = expected_load(spec, tokens)
    return (max(tokens * _routed_per_token(spec) * _expert_flops(spec) / FLOPS_PER_US,
                hit * _expert_bytes(spec) / BYTES_PER_US) + (10 + 4 * spec.num_experts) * NODE_US)


def _cost_fused(spec: MoESpec, tokens: int) -> float:
    hit, m = expected_load(spec, tokens)
    return (max(2 * tokens * spec.top_k * _expert_flops(spec) / FLOPS_PER_US,
                hit * min(max(m, 1.0), 2.0) * _expert_bytes(spec) / BYTES_PER_US) + 5 * NODE_US)


FUSED = "ort.moe_fused"
KERNELS: dict[str, dict] = {
    "onnx.dense_masked": dict(checker=_always, cost=_cost_dense, portable=True),
    "onnx.gather": dict(checker=_always, cost=_cost_gather, portable=True),
    FUSED: dict(checker=_fused_checker, cost=_cost_fused, portable=False),
}


def checker(name: str, spec: MoESpec, shapes: dict) -> bool | str:
    return KERNELS[name]["checker"](spec, shapes)


def cost(name: str, spec: MoESpec, tokens: int) -> float:
    return KERNELS[name]["cost"](spec, tokens)


def emit_experts(name: str, xt, ids, weights, w_in, w_out, b_in, b_out, spec: MoESpec):
    """An experts node's ONNX graph (inside a torch.onnx translation) with portable kernel `name`
    (BY_TOKENS: one If on the token count per bucket boundary, dispatch.py)."""
    if name.startswith(BY_TOKENS + ":"):
        return dispatch.by_tokens(xt, spec.hidden, [
            (k, T, (lambda k=k: portable.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec, k)))
            for k, T in buckets_of(name)])
    return portable.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec, name)


def split(name: str) -> tuple[int | None, str | None]:
    """A layer's kernel -> (fused below T: None = never, 0 = always; the portable kernel for the
    rest, None if none): "onnx.by_tokens:ort.moe_fused@8:onnx.gather" -> (8, "onnx.gather")."""
    if name == FUSED:
        return 0, None
    if not name.startswith(BY_TOKENS + ":"):
        return None, name
    plan = buckets_of(name)
    if plan[0][0] != FUSED:
        return None, name
    rest = plan[1:]
    if len(rest) == 1:
        return plan[0][1], rest[0][0]
    return plan[0][1], BY_TOKENS + ":" + ":".join(k if T is None else f"{k}@{T}" for k, T in rest)


def buckets_of(name: str) -> list[tuple[str, int | None]]:
    """"onnx.by_tokens:<k0>@<T1>:<k1>@<T2>:<k2>" -> [(k0, T1), (k1, T2), (k2, None)]: k_i below T_(i+1)."""
    return token_buckets.decode(BY_TOKENS, name)


def buckets(spec: MoESpec, names: list[str]) -> list[tuple[str, int | None]]:
    """The cheapest of `names` per token bucket (powers of two up to 2^16), as [(kernel, below T), ...,
    (kernel, None)]: consecutive buckets with the same kernel merged; the fused op, if at all, first."""
    return token_buckets.plan(names, lambda n, T: cost(n, spec, T), first_only={FUSED}, scan=SCAN)


def choose(spec: MoESpec, shapes: dict, mode: str = "auto", tokens: int = 64,
           force: str | None = None, dispatch_by_tokens: bool = False) -> KernelChoice:
    """The kernel for one layer, with the reason and why each other candidate was not taken.
    dispatch_by_tokens (mode auto, no token count planned for): where the cheapest exact kernel
    differs between token buckets, each bucket's behind an If on T (BY_TOKENS)."""
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
    if mode == "fused":
        if ok["ort.moe_fused"] is not True:
            raise MoeccError(f"MoE layer {layer}: the fused com.microsoft::MoE cannot run it: "
                             f"{ok['ort.moe_fused']}; use --onnx-moe auto (fused where exact, else portable)")
        return KernelChoice(layer, "ort.moe_fused", "com.microsoft::MoE computes exactly this layer "
                            f"({spec.router.kind}, {spec.activation}, k={spec.top_k}; --onnx-moe fused)",
                            {n: "fused op asked for (--onnx-moe fused)" for n in KERNELS if n != "ort.moe_fused"})
    if mode == "portable":
        rejected["ort.moe_fused"] = "not asked for (--onnx-moe portable)"
    exact = [n for n in KERNELS if ok[n] is True]
    plan = buckets(spec, exact) if mode == "auto" and dispatch_by_tokens else []
    if len(plan) > 1:
        name = token_buckets.encode(BY_TOKENS, plan)
        lo = token_buckets.lows(plan)
        where = ", ".join(f"{k} for {a} ≤ T < {T}" if T else f"{k} from T = {a} on" for (k, T), a in zip(plan, lo))
        used = {k for k, _ in plan}
        return KernelChoice(layer, name, f"run-time dispatch on the token count T (ONNX If; cheapest per "
                            f"power-of-two bucket by the cost model): {where}",
                            {**rejected, **{n: "costlier in every token bucket" for n in exact if n not in used}})
    candidates = sorted((costs[n], n) for n in KERNELS if ok[n] is True and (mode == "auto" or KERNELS[n]["portable"]))
    best_cost, best = candidates[0]
    for c, n in candidates[1:]:
        rejected[n] = f"costlier at {tokens} tokens: est {c:.0f} µs vs {best_cost:.0f} µs"
    if best == "ort.moe_fused":
        return KernelChoice(layer, best, "com.microsoft::MoE computes exactly this layer "
                            f"({spec.router.kind}, {spec.activation}, k={spec.top_k}) and is the cheapest at "
                            f"{tokens} tokens (est {best_cost:.0f} µs)", rejected)
    kind = "kernel" if mode == "auto" else "portable kernel"
    return KernelChoice(layer, best, f"cheapest {kind} at {tokens} tokens (est {best_cost:.0f} µs)", rejected)
