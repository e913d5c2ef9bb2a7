"""Standard-ONNX translation of `moecc::experts` (opset 18 ops only: runs on any ONNX runtime).

    experts(xt [T, H], ids [T, S] (-1 = empty slot), weights [T, S], w_in, w_out, b_in?, b_out?)  ⇒  y [T, H]

Routing is not here: a decomposed program routes with ATen ops traced from moecc/routing.py, which
torch.onnx translates like any other op. Two expert formulations (the kernels of backends/onnx/kernels.py):

    dense_masked:  every expert on every token, y = Σ_e C[:, e] · expert_e(x)  with C [T, E] dense
    gather:        per expert e: Gather its routed tokens, two MatMuls, then one ScatterND(add)

Called inside torch.onnx's translation (onnxscript tracing): Python control flow on the spec picks
the ops, so each layer gets exactly the graph its spec needs. Intermediate values carry no dtype at
trace time, hence CastLike against `x` / `logits` wherever a constant meets a tensor.
"""
from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript import opset18 as op

from moecc.spec import MoESpec

from .consts import arange, int0, ints, scalar, shape


def flat_tokens(x, width: int):
    """[..., W] -> ([T, W], T [1] int64, rows [1] int64); no -1 in the Reshape, so T = 0 works too.
    rows = the product of the dims before the last two (sequences, for per-row capacity), at least 1."""
    T = op.ReduceProd(op.Shape(x, start=0, end=-1), keepdims=1)           # [1]
    rank = len(x.shape) if x.shape is not None else 2
    rows = op.Max(op.ReduceProd(op.Shape(x, start=0, end=-2), keepdims=1), ints(1)) if rank > 2 else ints(1)
    return op.Reshape(x, shape(T, width)), T, rows


# ---------------------------------------------------------------- experts (moecc/ops.py)

def activate(h, spec: MoESpec, F: int):
    """[..., R] -> [..., F]: moecc.ops.activate in ONNX ops."""
    a = spec.activation
    if a == "relu":
        return op.Relu(h)
    if a == "relu2":
        r = op.Relu(h)
        return op.Mul(r, r)
    if a in ("gelu", "gelu_tanh"):
        return _gelu(h, a == "gelu_tanh")
    if a == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if spec.interleaved:
        gate = op.Slice(h, ints(0), ints(2 * F), ints(-1), ints(2))
        up = op.Slice(h, ints(1), ints(2 * F), ints(-1), ints(2))
    else:
        gate = op.Slice(h, ints(0), ints(F), ints(-1))
        up = op.Slice(h, ints(F), ints(2 * F), ints(-1))
    if a == "swiglu":
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    if a in ("geglu", "geglu_tanh"):
        return op.Mul(_gelu(gate, a == "geglu_tanh"), up)
    if a == "swiglu_clamp":
        lim = spec.act_limit
        gate = op.Min(gate, scalar(lim, h))
        up = op.Max(op.Min(up, scalar(lim, h)), scalar(-lim, h))
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    if a == "swiglu_softcap":
        cg, cu = scalar(spec.act_limit, h), scalar(spec.act_alpha, h)
        capped_g = op.Mul(op.Tanh(op.Div(gate, cg)), cg)
        capped_u = op.Mul(op.Tanh(op.Div(up, cu)), cu)
        return op.Mul(op.Mul(capped_g, op.Sigmoid(gate)), capped_u)
    # swiglu_oai (GPT-OSS): clamped, (up + 1) * gate * sigmoid(alpha * gate)
    lim = spec.act_limit
    gate = op.Min(gate, scalar(lim, h))
    up = op.Max(op.Min(up, scalar(lim, h)), scalar(-lim, h))
    glu = op.Mul(gate, op.Sigmoid(op.Mul(gate, scalar(spec.act_alpha, h))))
    return op.Mul(op.Add(up, scalar(1.0, h)), glu)


def _gelu(h, tanh: bool):
    if tanh:   # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = op.Mul(op.Add(h, op.Mul(scalar(0.044715, h), op.Mul(op.Mul(h, h), h))),
                       scalar(math.sqrt(2.0 / math.pi), h))
        return op.Mul(op.Mul(h, scalar(0.5, h)), op.Add(op.Tanh(inner), scalar(1.0, h)))
    return op.Mul(op.Mul(h, scalar(0.5, h)), op.Add(op.Erf(op.Mul(h, scalar(math.sqrt(0.5), h))), scalar(1.0, h)))


def linear(x, w, b=None, stacked: bool = False):
    """x [..., in] · w [out, in]^T (+ b), nn.Linear layout; stacked: w [E, out, in] batched over E.
    The bias is added to the MatMul's result (spec.bias_add "after_gemm"; "in_gemm" differs from it
    only by half-precision rounding)."""
    y = op.MatMul(x, op.Transpose(w, perm=[0, 2, 1] if stacked else [1, 0]))
    return y if b is None else op.Add(y, b)


def ffn(x, w_in, b_in, w_out, b_out, spec: MoESpec, stacked: bool = False):
    """One expert (or all E, stacked): [..., H] -> [..., H]."""
    h = activate(linear(x, w_in, b_in, stacked), spec, spec.ffn)
    return linear(h, w_out, b_out, stacked)


def weigh(h, w, xt, spec: MoESpec, half: bool):
    """moecc.ops.weigh: h (xt's dtype) · w (the routing weights' dtype) in xt's dtype, as spec.combine
    says: "weight_fp32" multiplies in float32 and rounds the product (half-precision layers only)."""
    if half and spec.combine == "weight_fp32":
        return op.CastLike(op.Mul(op.Cast(h, to=ir.DataType.FLOAT), op.Cast(w, to=ir.DataType.FLOAT)), xt)
    return op.Mul(h, op.CastLike(w, xt))


def dense_masked(xt, C, w_in, w_out, b_in, b_out, spec: MoESpec, half: bool = False):
    """xt [T, H], C [T, E] -> [T, H]: every expert on every token, weighted by C (0 = not routed)."""
    b_in, b_out = (None if b is None else op.Unsqueeze(b, ints(1)) for b in (b_in, b_out))   # [E, 1, R|H]
    out = ffn(op.Unsqueeze(xt, ints(0)), w_in, b_in, w_out, b_out, spec, stacked=True)     # [E, T, H]
    wc = op.Unsqueeze(op.Transpose(C, perm=[1, 0]), ints(-1))                   # [E, T, 1]
    return op.ReduceSum(weigh(out, wc, xt, spec, half), ints(0), keepdims=0)


def gather(xt, weights, ids, w_in, w_out, b_in, b_out, spec: MoESpec, wide: bool = False, E: int | None = None):
    """xt [T, H] -> [T, H]: the reference's loop; expert e runs only on the rows routed to it.
    wide (half-precision layers): accumulate in float32 (onnxruntime's CPU ScatterND has no float16
    'add'), each weighted output rounded to xt's dtype first as the reference does."""
    toks, parts = [], []
    for e in range(spec.num_experts if E is None else E):
        where = op.Transpose(op.NonZero(op.Equal(ids, ints(e))), perm=[1, 0])     # [n, 2] (token, slot)
        tok = op.Gather(where, int0(0), axis=1)                                  # [n]
        pick = lambda w: op.Gather(w, int0(e), axis=0)  # noqa: E731
        h = ffn(op.Gather(xt, tok, axis=0), pick(w_in), None if b_in is None else pick(b_in),
                pick(w_out), None if b_out is None else pick(b_out), spec)          # [n, H]
        w = op.Unsqueeze(op.GatherND(weights, where), ints(-1))                    # [n, 1]
        toks.append(tok)
        parts.append(weigh(h, w, xt, spec, wide))
    part = op.Concat(*parts, axis=0)                                                # [Σn, H]
    part = op.Cast(part, to=ir.DataType.FLOAT) if wide else part
    y = op.ScatterND(op.Expand(scalar(0.0, part), op.Shape(xt)), op.Unsqueeze(op.Concat(*toks, axis=0), ints(-1)),
                     part, reduction="add")
    return op.CastLike(y, xt) if wide else y


def shared_expert(xt, w_in, w_out, gate, spec: MoESpec):
    """moecc.ops.shared_expert: always-on FFN of width shared_ffn, optionally sigmoid-gated."""
    y = linear(activate(linear(xt, w_in), spec, spec.shared_ffn), w_out)
    return y if gate is None else op.Mul(op.Sigmoid(linear(xt, gate)), y)


def dense_weights(weights, ids, E: int):
    """(weights [T, S], ids [T, S]) -> C [T, E]; empty slots (id -1) match no expert."""
    hit = op.CastLike(op.Equal(op.Unsqueeze(ids, ints(-1)), arange(E)), weights)        # [T, S, E]
    return op.ReduceSum(op.Mul(op.Unsqueeze(weights, ints(-1)), hit), ints(1), keepdims=0)


def experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec: MoESpec, kernel: str):
    """The experts node: xt [T, H] -> [T, H] with `kernel` in onnx.dense_masked | onnx.gather.
    E' = the experts w_in holds (all of the layer's, or a rank's local ones)."""
    half = xt.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    E = w_in.shape[0] if w_in.shape is not None and isinstance(w_in.shape[0], int) else spec.num_experts
    if kernel == "onnx.gather":
        return gather(xt, weights, ids, w_in, w_out, b_in, b_out, spec, wide=half, E=E)
    return dense_masked(xt, dense_weights(weights, ids, E), w_in, w_out, b_in, b_out, spec, half)
