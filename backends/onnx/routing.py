"""Router math in standard ONNX ops: the same families, in the same order of operations, as moecc/routing.py.

    route(logits [T, L], spec, T, rows) -> (weights [T, S], ids [T, S] int64, dense [T, E] or None)

Runs inside torch.onnx's translation (onnxscript tracing), so Python branches on the spec choose
the ops and T (the token count) stays symbolic: capacities that depend on T are computed in the
graph, in float64, with the reference's order of operations. Dropped or unpicked slots get id -1
and weight 0, as in the reference. ONNX TopK, like torch.topk, returns the best first; on exactly
equal scores it takes the lower index (torch on CPU does too, but does not promise it).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from moecc.errors import MoeccError
from moecc.routing import HASH_MULT
from moecc.spec import MoESpec

FLOAT, DOUBLE, INT64, BOOL = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64, ir.DataType.BOOL


def ints(*v: int):
    """A 1-d int64 constant (shapes, axes, K of TopK)."""
    return op.Constant(value=ir.tensor(np.array(v, dtype=np.int64)))


def int0(v: int):
    """A 0-d int64 constant (Range bounds, CumSum's axis)."""
    return op.Constant(value=ir.tensor(np.array(v, dtype=np.int64)))


def arange(n: int):
    return op.Range(int0(0), int0(n), int0(1))


def scalar(v: float, like):
    """A 0-d constant in `like`'s dtype."""
    return op.CastLike(op.Constant(value=ir.tensor(np.array(v, dtype=np.float64))), like)


def shape(*dims):
    """Concat of 1-d int64 pieces and Python ints into a shape tensor."""
    return op.Concat(*(ints(d) if isinstance(d, int) else d for d in dims), axis=0)


def route(logits, spec: MoESpec, T, rows, router_bias=None, token_ids=None, logits_dtype=None):
    """logits [T, L] -> (weights [T, S], ids [T, S], dense [T, E] when the router is dense already)."""
    r = spec.router
    if r.fp32 and logits_dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):   # at least fp32
        logits = op.Cast(logits, to=FLOAT)
    if r.kind == "softmax_topk":
        probs = op.Softmax(logits, axis=-1)                                 # [T, E]
        choice = group_limit(probs, spec, T) if r.n_groups > 1 else probs
        weights, ids = pick(probs, choice, r.top_k, 0.0 if r.renormalize else None)
    elif r.kind == "topk_softmax":
        top, ids = op.TopK(logits, ints(r.top_k), axis=-1)                 # [T, k]
        weights = op.Softmax(top, axis=-1)
    elif r.kind == "sigmoid_topk":
        scores = op.Sigmoid(logits)                                         # [T, E]
        choice = scores if router_bias is None else op.Add(scores, op.CastLike(router_bias, scores))
        choice = group_limit(choice, spec, T) if r.n_groups > 1 else choice
        weights, ids = pick(scores, choice, r.top_k, 1e-20 if r.renormalize else None)
    elif r.kind == "hierarchical":
        G, E = r.n_groups, spec.num_experts
        group_p = op.Softmax(op.Slice(logits, ints(0), ints(G), ints(1)), axis=-1)       # [T, G]
        inner = op.Softmax(op.Reshape(op.Slice(logits, ints(G), ints(G + E), ints(1)), shape(T, G, E // G)), axis=-1)
        probs = op.Reshape(op.Mul(op.Unsqueeze(group_p, ints(-1)), inner), shape(T, E))  # [T, E]
        choice = group_limit(probs, spec, T, op.Slice(logits, ints(0), ints(G), ints(1)))
        weights, ids = pick(probs, choice, r.top_k, 0.0 if r.renormalize else None)
    elif r.kind == "expert_choice":
        return _expert_choice(logits, spec, T)
    elif r.kind == "hash":
        weights, ids = _hash(logits, spec, T, token_ids)
    elif r.kind == "topk_unit":
        _, ids = op.TopK(logits, ints(r.top_k), axis=-1)                   # [T, k]
        weights = op.Expand(scalar(1.0, logits), shape(T, r.top_k))
    else:
        raise MoeccError(f"MoE layer {spec.name or '?'}: the ONNX backend has no lowering for router "
                         f"{r.kind!r}")
    if r.scaling != 1.0:
        weights = op.Mul(weights, scalar(r.scaling, weights))
    if r.capacity_factor is not None or getattr(r, "capacity", 0):
        weights, ids = capacity(weights, ids, spec, T, rows)
    return weights, ids, None


def pick(probs, choice, k: int, renorm_eps: float | None):
    """ids = top-k of choice; weights = probs at ids [/ (Σ + eps)]."""
    _, ids = op.TopK(choice, ints(k), axis=-1)                              # [T, k]
    weights = op.GatherElements(probs, ids, axis=1)
    if renorm_eps is None:
        return weights, ids
    total = op.ReduceSum(weights, ints(-1), keepdims=1)
    return op.Div(weights, total if renorm_eps == 0.0 else op.Add(total, scalar(renorm_eps, total))), ids


def mask_of(idx, n: int):
    """idx [T, j] -> [T, n] bool, True where the position occurs in the row (scatter_(1, idx, True))."""
    hit = op.Cast(op.Equal(op.Unsqueeze(idx, ints(-1)), arange(n)), to=INT64)  # [T, j, n]
    return op.Cast(op.ReduceMax(hit, ints(1), keepdims=0), to=BOOL)


def group_limit(choice, spec: MoESpec, T, group_scores=None):
    """[T, E] -> [T, E], experts outside each token's topk_groups best groups set to -inf."""
    r, E, G = spec.router, spec.num_experts, spec.router.n_groups
    grouped = op.Reshape(choice, shape(T, G, E // G))                       # [T, G, E/G]
    if group_scores is None and r.group_score == "max":
        group_scores = op.ReduceMax(grouped, ints(-1), keepdims=0)          # [T, G]
    elif group_scores is None:
        top, _ = op.TopK(grouped, ints(min(2, E // G)), axis=-1)
        group_scores = op.ReduceSum(top, ints(-1), keepdims=0)
    _, group_ids = op.TopK(group_scores, ints(r.topk_groups), axis=-1)      # [T, g]
    keep = op.Expand(op.Unsqueeze(mask_of(group_ids, G), ints(-1)), shape(T, G, E // G))
    return op.Where(op.Reshape(keep, shape(T, E)), choice, scalar(float("-inf"), choice))


def _ceil_f64(T, factors: list[float], divisor: float):
    """ceil(T · f1 · f2 ... / divisor) in float64 (left to right, like the Python reference) -> int64 [1]."""
    v = op.Cast(T, to=DOUBLE)
    for f in factors:
        v = op.Mul(v, op.Constant(value=ir.tensor(np.array([f], dtype=np.float64))))
    v = op.Div(v, op.Constant(value=ir.tensor(np.array([divisor], dtype=np.float64))))
    return op.Cast(op.Ceil(v), to=INT64)


def _expert_choice(logits, spec: MoESpec, T):
    """Each expert takes its top-C tokens by softmax score; C = clamp(ceil(c·T/E), 1, T)."""
    E = spec.num_experts
    cf = spec.router.capacity_factor or float(spec.top_k)
    probs = op.Softmax(logits, axis=-1)                                     # [T, E]
    cap = op.Max(op.Min(_ceil_f64(T, [cf], E), T), ints(1))                 # [1]
    _, tok = op.TopK(op.Transpose(probs, perm=[1, 0]), cap, axis=-1)        # [E, C]
    zeros = op.Expand(scalar(0.0, probs), shape(E, T))
    picked = op.ScatterElements(zeros, tok, op.Expand(scalar(1.0, probs), op.Shape(tok)), axis=1)
    picked = op.Transpose(picked, perm=[1, 0])                              # [T, E] 0/1
    weights = op.Mul(op.Mul(probs, picked), scalar(spec.router.scaling, probs))
    ids = op.Where(op.Cast(picked, to=BOOL), op.Expand(arange(E), shape(T, E)), ints(-1))
    return weights, ids, weights                                            # already dense [T, E]


def _hash(logits, spec: MoESpec, T, token_ids):
    """token id -> k distinct experts ((id·HASH_MULT) mod 2^31 + j) mod E, each weighted 1/k."""
    E, k = spec.num_experts, spec.top_k
    if token_ids is None:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hash routing needs token ids, but none reach "
                         f"this layer in the exported program")
    tid = op.Reshape(op.Cast(token_ids, to=INT64), ints(-1))               # [T]
    base = op.Mod(op.Mul(tid, ints(HASH_MULT)), ints(2 ** 31))
    ids = op.Mod(op.Add(op.Unsqueeze(base, ints(-1)), arange(k)), ints(E))  # [T, k]
    return op.Expand(scalar(1.0 / k, logits), shape(T, k)), ids            # 1/k in the logits' dtype


def capacity(weights, ids, spec: MoESpec, T, rows):
    """Drop assignments past each expert's capacity, slot-major priority, per row if capacity_per_row."""
    r, E, k = spec.router, spec.num_experts, spec.top_k
    R = rows if getattr(r, "capacity_per_row", False) else ints(1)          # [1]
    S = op.Div(T, R)                                                        # tokens per row
    if getattr(r, "capacity", 0):
        cap = ints(r.capacity)
    else:
        cap = op.Max(_ceil_f64(S, [r.capacity_factor, float(k)], E), ints(1))
    flat = op.Reshape(op.Transpose(op.Reshape(ids, shape(R, S, k)), perm=[0, 2, 1]), shape(R, op.Mul(S, ints(k))))
    onehot = op.Cast(op.Equal(op.Unsqueeze(flat, ints(-1)), arange(E)), to=INT64)       # [R, k*S, E]
    position = op.Sub(op.ReduceSum(op.Mul(op.CumSum(onehot, int0(1)), onehot), ints(-1), keepdims=0), ints(1))
    keep = op.And(op.Less(position, cap), op.GreaterOrEqual(flat, ints(0)))              # [R, k*S]
    keep = op.Reshape(op.Transpose(op.Reshape(keep, shape(R, k, S)), perm=[0, 2, 1]), shape(T, k))
    return op.Mul(weights, op.CastLike(keep, weights)), op.Where(keep, ids, ints(-1))


def dense_weights(weights, ids, E: int):
    """(weights [T, S], ids [T, S]) -> C [T, E]; dropped slots (id -1) match no expert."""
    hit = op.CastLike(op.Equal(op.Unsqueeze(ids, ints(-1)), arange(E)), weights)        # [T, S, E]
    return op.ReduceSum(op.Mul(op.Unsqueeze(weights, ints(-1)), hit), ints(1), keepdims=0)
