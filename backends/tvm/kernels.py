"""MoE kernels for TVM on CPU: three ways to run the experts of one layer, chosen per layer by cost.

    experts(x [T, H], weights [T, S], ids [T, S]) -> y [T, H] = Σ_s weights[t, s] · expert_{ids[t, s]}(x[t])

- "tvm.gather"       (decode)  every (token, slot) row reads its own expert's weights: gather_gemv → act →
                               gather_gemv → combine. No sort; weights read once per row.
- "tvm.grouped_gemm" (prefill) sort the T·S rows by expert (argsort; counts by one_hot-sum, segment ends by
                               cumsum: the importer has no bincount/scatter_add), then segment_gemm over each
                               expert's segment (dynamic sizes) → act → segment_gemm writing rows back to
                               token order → combine. Weights reused across the rows of a tile.
- "tvm.dense_masked" (baseline) every expert on every token (segments of T rows each), combined by the
                               dense [T, E] gate matrix. Wasteful unless E is tiny.

Each kernel has `checker(spec, shapes) -> True | reason` and `cost(spec, tokens) -> µs estimate`;
`select` picks the cheapest that accepts the layer, recording why the others lost.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from tvm import relax, te, tirx

from moecc.backends.base import KernelChoice
from moecc.errors import MoeccError
from moecc.spec import MoESpec

from . import tir

op = relax.op
DTYPES = ("float32", "float16", "bfloat16")
DENSE_MAX_EXPERTS = 64


# ---------------------------------------------------------------- shared pieces


def dims(expr: relax.Expr) -> list:
    """The (possibly symbolic) shape of a Relax tensor, as PrimExprs."""
    return list(expr.ty.shape.values)


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def prim(value, dtype: str) -> relax.PrimValue:
    """A scalar for ops that take PrimValues (one_hot's on/off values)."""
    imm = tirx.IntImm(dtype, value) if dtype.startswith(("int", "uint")) else tirx.FloatImm(dtype, value)
    return relax.prim_value(imm)


def activation(bb: relax.BlockBuilder, h, spec: MoESpec):
    """[N, R] -> [N, F]: moecc.ops.activate in Relax (gated: [gate; up] halves, or interleaved rows)."""
    a = spec.activation
    if a == "relu":
        return bb.emit(op.nn.relu(h))
    if a == "relu2":
        r = bb.emit(op.nn.relu(h))
        return bb.emit(op.multiply(r, r))
    if a == "gelu":
        return bb.emit(op.nn.gelu(h))
    if a == "gelu_tanh":
        return bb.emit(op.nn.gelu_tanh(h))
    if a == "silu":
        return bb.emit(op.nn.silu(h))
    F = int(dims(h)[-1]) // 2
    if spec.interleaved:
        gate = bb.emit(op.strided_slice(h, [1], [0], [2 * F], [2]))
        up = bb.emit(op.strided_slice(h, [1], [1], [2 * F], [2]))
    else:
        gate = bb.emit(op.strided_slice(h, [1], [0], [F]))
        up = bb.emit(op.strided_slice(h, [1], [F], [2 * F]))
    if a == "swiglu":
        return bb.emit(op.multiply(op.nn.silu(gate), up))
    if a == "geglu":
        return bb.emit(op.multiply(op.nn.gelu(gate), up))
    if a == "geglu_tanh":
        return bb.emit(op.multiply(op.nn.gelu_tanh(gate), up))
    if a == "swiglu_clamp":
        lim, dt = spec.act_limit, dtype_of(h)
        gate = bb.emit(op.minimum(gate, relax.const(lim, dt)))
        up = bb.emit(op.minimum(op.maximum(up, relax.const(-lim, dt)), relax.const(lim, dt)))
        return bb.emit(op.multiply(op.nn.silu(gate), up))
    if a == "swiglu_softcap":
        dt = dtype_of(h)
        g, u = (bb.emit(op.astype(t, "float32")) for t in (gate, up))
        cg, cu = (relax.const(c, "float32") for c in (spec.act_limit, spec.act_alpha))
        capped_g = op.multiply(op.tanh(op.divide(g, cg)), cg)
        capped_u = op.multiply(op.tanh(op.divide(u, cu)), cu)
        return bb.emit(op.astype(op.multiply(op.multiply(capped_g, op.sigmoid(g)), capped_u), dt))
    dt, lim = dtype_of(h), spec.act_limit                                   # swiglu_oai (GPT-OSS)
    gate = bb.emit(op.minimum(gate, relax.const(lim, dt)))
    up = bb.emit(op.minimum(op.maximum(up, relax.const(-lim, dt)), relax.const(lim, dt)))
    glu = bb.emit(op.multiply(gate, op.sigmoid(op.multiply(gate, relax.const(spec.act_alpha, dt)))))
    return bb.emit(op.multiply(op.add(up, relax.const(1.0, dt)), glu))


def bias_or_zeros(b, E: int, rows: int, dtype: str):
    return b if b is not None else relax.const(np.zeros((E, rows), dtype=dtype), dtype)


def weigh(o, w, spec: MoESpec):
    """moecc.ops.weigh on TE scalars: o (activation dtype) · w (routing weight) in o's dtype, as
    spec.combine says ("weight_fp32": the product in float32, then rounded; half types only).
    spec.bias_add is not reproduced here: the TIR GEMMs add the bias in their float32 accumulator."""
    if spec.combine == "weight_fp32" and o.dtype in ("float16", "bfloat16"):
        return (o.astype("float32") * w.astype("float32")).astype(o.dtype)
    return o * w.astype(o.dtype)


def combine(bb, o, weights, ids, spec: MoESpec):
    """y[t, h] = Σ_s (ids[t, s] >= 0) · weights[t, s] · o[t·S + s, h]; unwritten rows never reach y."""
    def fn(o_t, w_t, ids_t):
        S = ids_t.shape[1]
        s = te.reduce_axis((0, S), name="s")
        return te.compute((ids_t.shape[0], o_t.shape[1]), lambda t, h: te.sum(tirx.Select(
            ids_t[t, s] >= 0, weigh(o_t[t * S + s, h], w_t[t, s], spec), tirx.const(0, o_t.dtype)),
            axis=s), name="combine")
    return bb.emit_te(fn, o, weights, ids, primfunc_name_hint="moe_combine")


def knobs(tuned, kind: str, E: int, R: int, K: int, dtype: str) -> dict | None:
    """The tuned schedule knobs of one expert GEMM (tune.py), or None: the default schedule."""
    return None if tuned is None else tuned(kind, int(E), int(R), int(K), dtype)


def call(bb, func, name: str, args: list, shape, dtype: str):
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))


# ---------------------------------------------------------------- the three kernels


def emit_gather(bb, x, weights, ids, p: dict, spec: MoESpec, lanes: int, tuned=None):
    T, S = dims(ids)
    E, H, F, R, dt = int(dims(p["w_in"])[0]), spec.hidden, spec.ffn, spec.in_rows, dtype_of(x)   # E' experts held
    flat = bb.emit(op.reshape(ids, (T * S,)))                             # [N]
    h = call(bb, tir.gather_gemv(E, R, H, int(S), dt, lanes, knobs(tuned, "gather_gemv", E, R, H, dt)), "moe_gather_in",
             [x, flat, p["w_in"], bias_or_zeros(p["b_in"], E, R, dt)], (T * S, R), dt)     # [N, R]
    a = activation(bb, h, spec)                                           # [N, F]
    o = call(bb, tir.gather_gemv(E, H, F, 1, dt, lanes, knobs(tuned, "gather_gemv", E, H, F, dt)), "moe_gather_out",
             [a, flat, p["w_out"], bias_or_zeros(p["b_out"], E, H, dt)], (T * S, H), dt)   # [N, H]
    return combine(bb, o, weights, ids, spec)


def emit_grouped(bb, x, weights, ids, p: dict, spec: MoESpec, lanes: int, tuned=None):
    T, S = dims(ids)
    N = T * S
    E, H, F, R, dt = int(dims(p["w_in"])[0]), spec.hidden, spec.ffn, spec.in_rows, dtype_of(x)   # E' experts held
    flat = bb.emit(op.reshape(ids, (N,)))                                 # [N]
    key = bb.emit(op.where(op.less(flat, relax.const(0, "int64")), relax.const(E, "int64"), flat))
    order = bb.emit(op.argsort(key, dtype="int64"))                       # [N] rows by expert, dropped last
    # one extra row per expert, taken off again: TVM leaves a sum over 0 rows (T = 0) uninitialized,
    # and garbage segment sizes would send segment_gemm out of bounds
    every = bb.emit(op.concat([flat, op.arange(0, E, dtype="int64")], axis=0))      # [N + E]
    onehot = bb.emit(op.one_hot(every, prim(1, "int64"), prim(0, "int64"), E))      # [N + E, E]
    counts = bb.emit(op.subtract(op.sum(onehot, axis=0), relax.const(1, "int64")))  # [E] segment sizes
    ends = bb.emit(op.cumsum(counts, axis=0, dtype="int64"))             # [E] segment ends
    token = bb.emit(op.floor_divide(order, relax.const(int(S), "int64")))   # [N] source token per row
    rows = bb.emit(op.arange(0, N, dtype="int64"))
    h = call(bb, tir.segment_gemm(E, R, H, dt, lanes, knobs(tuned, "segment_gemm", E, R, H, dt)), "moe_segment_in",
             [x, token, rows, counts, ends, p["w_in"], bias_or_zeros(p["b_in"], E, R, dt)], (N, R), dt)
    a = activation(bb, h, spec)                                           # [N, F] sorted rows
    o = call(bb, tir.segment_gemm(E, H, F, dt, lanes, knobs(tuned, "segment_gemm", E, H, F, dt)), "moe_segment_out",
             [a, rows, order, counts, ends, p["w_out"], bias_or_zeros(p["b_out"], E, H, dt)], (N, H), dt)
    return combine(bb, o, weights, ids, spec)                             # o back in token order


def every_token(bb, x, E: int):
    """Segments of E experts that each take every row of x [T, H]: expert e has rows [e·T, (e+1)·T).
    -> counts [E], ends [E], token [E·T] (the source row of each)."""
    def segments(x_t):
        n = x_t.shape[0]
        return [te.compute((E,), lambda e: n, name="counts"),
                te.compute((E,), lambda e: (e + 1) * n, name="ends"),
                te.compute((E * n,), lambda i: i % n, name="token")]
    segs = bb.emit_te(segments, x, primfunc_name_hint="dense_segments")
    return tuple(bb.emit(relax.TupleGetItem(segs, i)) for i in range(3))


def dense_ffn(bb, x, w_in, w_out, b_in, b_out, spec: MoESpec, lanes: int, tuned=None):
    """Every one of the E experts on every token: x [T, H] -> o [E·T, H] (row e·T + t)."""
    T, H = dims(x)
    E, R, F = int(dims(w_in)[0]), int(dims(w_in)[1]), int(dims(w_out)[2])
    dt = dtype_of(x)
    counts, ends, token = every_token(bb, x, E)
    rows = bb.emit(op.arange(0, E * T, dtype="int64"))                   # [E*T]
    h = call(bb, tir.segment_gemm(E, R, int(H), dt, lanes, knobs(tuned, "segment_gemm", E, R, int(H), dt)), "moe_dense_in",
             [x, token, rows, counts, ends, w_in, bias_or_zeros(b_in, E, R, dt)], (E * T, R), dt)
    a = activation(bb, h, spec)                                           # [E*T, F]
    return call(bb, tir.segment_gemm(E, int(H), F, dt, lanes, knobs(tuned, "segment_gemm", E, int(H), F, dt)), "moe_dense_out",
                [a, rows, rows, counts, ends, w_out, bias_or_zeros(b_out, E, int(H), dt)], (E * T, H), dt)


def emit_dense(bb, x, weights, ids, p: dict, spec: MoESpec, lanes: int, tuned=None):
    o = dense_ffn(bb, x, p["w_in"], p["w_out"], p["b_in"], p["b_out"], spec, lanes, tuned)   # [E*T, H]
    E, H = int(dims(p["w_in"])[0]), spec.hidden

    def fn(o_t, w_t, ids_t):                                              # y = Σ_e gate[t, e] · o[e·T + t]
        Tn, Sn = ids_t.shape
        s = te.reduce_axis((0, Sn), name="s")
        gate = te.compute((Tn, E), lambda t, e: te.sum(tirx.Select(
            ids_t[t, s] == e, w_t[t, s], tirx.const(0, w_t.dtype)), axis=s), name="gate")
        k = te.reduce_axis((0, E), name="e")
        return te.compute((Tn, H), lambda t, h: te.sum(
            weigh(o_t[k * Tn + t, h], gate[t, k], spec), axis=k), name="dense_combine")
    return bb.emit_te(fn, o, weights, ids, primfunc_name_hint="moe_dense_combine")


# ---------------------------------------------------------------- checkers and costs

# Calibrated on one core of the `llvm` (generic x86-64, SSE) target with samples/bench_tvm.py:
# segment_gemm sustains ~28 GFLOP/s on full tiles, gather_gemv streams weights at ~25 GB/s.
SEGMENT_FLOPS, GATHER_BYTES_PER_S, BYTES_PER_S, OP_OVERHEAD = 28e9, 25e9, 25e9, 5e-6


def _common(spec: MoESpec, shapes: dict) -> bool | str:
    dtype = shapes.get("dtype", "float32")
    return True if dtype in DTYPES else f"dtype {dtype} (TVM MoE kernels take {', '.join(DTYPES)})"


def check_gather(spec, shapes):
    return _common(spec, shapes)


def check_grouped(spec, shapes):
    return _common(spec, shapes)


def check_dense(spec, shapes):
    if spec.num_experts > DENSE_MAX_EXPERTS:
        return f"E={spec.num_experts} > {DENSE_MAX_EXPERTS}: dense-masked runs every expert on every token"
    return _common(spec, shapes)


def _slots(spec: MoESpec) -> int:
    return spec.num_experts if spec.router.kind == "expert_choice" else spec.top_k


def _expert_bytes(spec: MoESpec) -> int:
    """Bytes of one expert's weights (fp32); a row through an expert costs half as many FLOPs."""
    return 4 * (spec.in_rows * spec.hidden + spec.hidden * spec.ffn)


def _segments_time(spec: MoESpec, active: float, tiles: float) -> float:
    """TM-row tiles on the segment GEMM; each active expert's weights read from memory once."""
    flops = tiles * tir.TM * _expert_bytes(spec) / 2
    return max(flops / SEGMENT_FLOPS, active * _expert_bytes(spec) / BYTES_PER_S)


def cost_gather(spec: MoESpec, tokens: int) -> float:
    rows = tokens * _slots(spec)                                          # each row streams its expert
    return 1e6 * (rows * _expert_bytes(spec) / GATHER_BYTES_PER_S + 5 * OP_OVERHEAD)


def cost_grouped(spec: MoESpec, tokens: int) -> float:
    rows, E = tokens * _slots(spec), spec.num_experts
    active = E * (1 - (1 - 1 / E) ** rows)                                # expected experts hit (uniform)
    tiles = active + max(0.0, rows - active) / tir.TM                     # a partial tile per expert
    sort = rows * max(1.0, math.log2(rows)) * 1e-8 + rows * E * 1e-9     # argsort, one_hot counts
    return 1e6 * (_segments_time(spec, active, tiles) + sort + 10 * OP_OVERHEAD)


def cost_dense(spec: MoESpec, tokens: int) -> float:
    E = spec.num_experts
    return 1e6 * (_segments_time(spec, E, E * math.ceil(tokens / tir.TM)) + 7 * OP_OVERHEAD)


class Kernel(NamedTuple):
    emit: Callable
    checker: Callable
    cost: Callable


KERNELS: dict[str, Kernel] = {
    "tvm.gather": Kernel(emit_gather, check_gather, cost_gather),
    "tvm.grouped_gemm": Kernel(emit_grouped, check_grouped, cost_grouped),
    "tvm.dense_masked": Kernel(emit_dense, check_dense, cost_dense),
}


def select(spec: MoESpec, shapes: dict, forced: str | None = None) -> KernelChoice:
    """The cheapest accepting kernel at shapes["tokens"]; `forced` must accept the layer or we say why not."""
    layer, tokens = spec.name or "?", int(shapes.get("tokens", 1))
    verdicts = {name: k.checker(spec, shapes) for name, k in KERNELS.items()}
    costs = {name: KERNELS[name].cost(spec, tokens) for name, ok in verdicts.items() if ok is True}
    if forced:
        if forced not in KERNELS:
            raise MoeccError(f"MoE layer {layer}: unknown TVM kernel {forced!r}; one of {', '.join(KERNELS)}")
        if verdicts[forced] is not True:
            raise MoeccError(f"MoE layer {layer}: kernel {forced} refuses it: {verdicts[forced]}")
        rejected = {n: "not requested" for n in KERNELS if n != forced}
        return KernelChoice(layer, forced, "requested in options", rejected)
    if not costs:
        raise MoeccError(f"MoE layer {layer}: no TVM kernel accepts it: {verdicts}")
    best = min(costs, key=costs.get)
    rejected = {n: (f"cost {costs[n]:.1f} µs > {costs[best]:.1f} µs at T={tokens}" if n in costs else v)
                for n, v in verdicts.items() if n != best}
    return KernelChoice(layer, best, f"lowest estimated cost at T={tokens}: {costs[best]:.1f} µs", rejected)
