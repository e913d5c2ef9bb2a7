"""Dense Linear layers (router, shared expert, a model's projections) onto the experts' GEMM kernel.

    matmul(x [..., K], permute_dims(W [R, K]))        what TVM's importer makes of aten.linear,
                                                      and of mm / addmm on W.t() (decomposed programs)
      ⇒  x2 = reshape(x, [M, K])                      M = the product of x's leading (symbolic) dims
         y2 = segment_gemm(E=1)(x2, W as [1, R, K])   ONE segment holding every row (tir.py)
         y  = reshape(y2, [..., R])

Why: TVM 0.27's CPU pipeline (relax.backend.cpu_generic) legalizes relax.matmul to a plain TE loop
nest and schedules nothing (dlight has no CPU matmul rule): scalar code, one thread, and W, a
function input (keep_params_as_input), is transposed on every call. On a DeepSeek-like layer (64
small experts, a router over 64, a shared expert as large as one expert) those Linears cost several
times the experts themselves. segment_gemm reads W in its stored layout [R, K] (K contiguous),
vectorized, blocked and row-tiled, with its weight-row blocks in parallel; the transpose goes away.

Only matmuls whose input and weight share one dtype of kernels.DTYPES, with static K and R, are
rewritten; any other stays as it is (logged). A half-precision Linear comes out of the importer as a
float32 matmul that a cast takes back to the input's dtype: the GEMM rounds to the input's dtype as torch
does (float32 accumulation either way). The bias add after the matmul is left as TVM made it.
"""
from __future__ import annotations

import logging
import math

import tvm
from tvm import relax, tirx

from . import tir
from .kernels import DTYPES, bias_or_zeros, dims, dtype_of, every_token

log = logging.getLogger("moecc.backends.tvm")

op = relax.op


def dense_linears(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every Relax function of mod with its `x @ W.T` matmuls on segment_gemm (see the module doc)."""
    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")

    @relax.expr_functor.mutator
    class Dense(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.done, self.kept = 0, []

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul):
                return call
            x, wt = call.args
            bound = self.lookup_binding(wt) if isinstance(wt, relax.Var) else None
            if not (isinstance(bound, relax.Call) and bound.op.same_as(permute)):
                return call
            why = refusal(x, bound, call)
            if why:
                self.kept.append(why)
                return call
            self.done += 1
            y = linear(self.builder_, x, bound.args[0], lanes)
            if dtype_of(call) != dtype_of(x):       # the importer's float32 result of a half Linear:
                y = op.astype(self.builder_.emit(y), dtype_of(call))     # torch rounds it to x's dtype
            return y

    dense = Dense(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            dense.builder_.update_func(gv, relax.analysis.remove_all_unused(dense.visit_expr(func)))
    if dense.done:
        log.info("TVM: %d Linear matmul(s) on the segment GEMM kernel (no per-call weight transpose)", dense.done)
    for why in dict.fromkeys(dense.kept):
        log.info("TVM: a Linear stays on TVM's default (unscheduled) matmul: %s", why)
    return dense.builder_.get()


def refusal(x, permuted: relax.Call, call: relax.Call) -> str | None:
    """Why this matmul(x, permute_dims(W)) is no x @ W.T that segment_gemm can run, or None."""
    w = permuted.args[0]
    axes = permuted.attrs.axes
    if not all(isinstance(getattr(t, "ty", None), relax.TensorType) and t.ty.shape is not None
               for t in (x, w, call)):
        return "a shape unknown at compile time"
    if w.ty.ndim != 2 or x.ty.ndim < 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
        return f"matmul of a {x.ty.ndim}-D input by a transposed {w.ty.ndim}-D tensor (not a Linear's 2-D weight)"
    (R, K), k = dims(w), dims(x)[-1]
    if not all(isinstance(d, tirx.IntImm) for d in (R, K, k)) or int(k) != int(K):
        return f"weight [{R}, {K}] and input [..., {k}] not static, or not matching"
    if dtype_of(x) != dtype_of(w) or not {dtype_of(x), dtype_of(call)} <= set(DTYPES):
        return (f"dtypes input {dtype_of(x)}, weight {dtype_of(w)}, result {dtype_of(call)} "
                f"(input and weight of one dtype of {', '.join(DTYPES)} wanted)")
    return None


def linear(bb: relax.BlockBuilder, x, w, lanes: int) -> relax.Expr:
    """x [..., K] @ w [R, K].T -> [..., R] (the last step not emitted: the caller binds it)."""
    (R, K), lead, dt = (int(d) for d in dims(w)), dims(x)[:-1], dtype_of(x)
    x2 = x if len(lead) == 1 else bb.emit(op.reshape(x, [math.prod(lead[1:], start=lead[0]), K]))   # [M, K]
    counts, ends, rows = every_token(bb, x2, 1)                           # [1], [1], [M]: one segment
    w3 = bb.emit(op.reshape(w, [1, R, K]))                                # [1, R, K]: a view, no copy
    gv = bb.add_func(tir.segment_gemm(1, R, K, dt, lanes), "linear_gemm")
    args = [x2, rows, rows, counts, ends, w3, bias_or_zeros(None, 1, R, dt)]
    y = relax.call_tir(gv, args, relax.TensorType((dims(x2)[0], R), dt))                # [M, R]
    return y if len(lead) == 1 else op.reshape(bb.emit(y), [*lead, R])   # [M, R] -> [..., R]
