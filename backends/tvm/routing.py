"""Router math in Relax: the same families, in the same order of operations, as moecc/routing.py.

    route(bb, logits [T, L], spec) -> (weights [T, S] float, ids [T, S] int64)

T is symbolic (one compiled module serves every token count). Slots that are dropped (capacity) or
not picked (expert choice) get id -1 and weight 0, exactly as in the PyTorch reference; token-count
dependent capacities are computed from the symbolic T inside the compiled module. Every router kind
of moecc/routing.py is expressed; ties between equal scores may be broken differently from torch.
"""
from __future__ import annotations

from tvm import relax, te, tirx

from moecc.errors import MoeccError
from moecc.routing import HASH_MULT
from moecc.spec import MoESpec

op = relax.op


def dims(expr: relax.Expr) -> list:
    """The (possibly symbolic) shape of a Relax tensor, as PrimExprs."""
    return list(expr.ty.shape.values)


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def prim(value, dtype: str) -> relax.PrimValue:
    """A scalar for ops that take PrimValues (one_hot's on/off values)."""
    imm = tirx.IntImm(dtype, value) if dtype.startswith(("int", "uint")) else tirx.FloatImm(dtype, value)
    return relax.prim_value(imm)


def topk(bb: relax.BlockBuilder, data, k: int, axis: int = -1):
    both = bb.emit(op.topk(data, k, axis=axis, ret_type="both", dtype="int64"))
    return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))


def mask_of(bb: relax.BlockBuilder, ids, depth: int, dtype: str):
    """[T, j] indices -> [T, depth] 0/1 mask of the picked entries (the reference's scatter_(1, ids, True))."""
    onehot = bb.emit(op.one_hot(ids, prim(1.0, dtype), prim(0.0, dtype), depth))  # [T, j, depth]
    return bb.emit(op.max(onehot, axis=1))


def route(bb: relax.BlockBuilder, logits, spec: MoESpec, correction_bias=None, token_ids=None,
          rows=(1, None)):
    """logits [T, L] -> (weights, ids) [T, S]. rows = (R, T/R): x was [R.., T/R, H] (per-row capacity)."""
    r = spec.router
    if r.fp32 and dtype_of(logits) in ("float16", "bfloat16"):          # fp32 router: at least fp32
        logits = bb.emit(op.astype(logits, "float32"))
    if r.kind == "softmax_topk":
        probs = bb.emit(op.nn.softmax(logits, axis=-1))                   # [T, E]
        choice = group_limit(bb, probs, spec) if r.n_groups > 1 else probs
        weights, ids = pick(bb, probs, choice, r.top_k, 0.0 if r.renormalize else None)
    elif r.kind == "topk_softmax":
        top, ids = topk(bb, logits, r.top_k)                               # [T, k]
        weights = bb.emit(op.nn.softmax(top, axis=-1))
    elif r.kind == "sigmoid_topk":
        scores = bb.emit(op.sigmoid(logits))                              # [T, E]
        choice = scores if correction_bias is None else \
            bb.emit(op.add(scores, op.astype(correction_bias, dtype_of(scores))))
        choice = group_limit(bb, choice, spec) if r.n_groups > 1 else choice
        weights, ids = pick(bb, scores, choice, r.top_k, 1e-20 if r.renormalize else None)
    elif r.kind == "hierarchical":
        probs, group_logits = hierarchical_probs(bb, logits, spec)        # [T, E], [T, G]
        choice = group_limit(bb, probs, spec, group_logits)              # groups by the 1st router
        weights, ids = pick(bb, probs, choice, r.top_k, 0.0 if r.renormalize else None)
    elif r.kind == "expert_choice":
        return expert_choice(bb, logits, spec)
    elif r.kind == "hash":
        weights, ids = hashed(bb, logits, spec, token_ids)
    elif r.kind == "topk_unit":                                           # moefy: each chosen expert × 1
        top, ids = topk(bb, logits, r.top_k)                               # [T, k]
        weights = bb.emit(op.ones_like(top))
    else:
        raise MoeccError(f"MoE layer {spec.name or '?'}: router kind {r.kind!r} has no TVM lowering")
    if r.scaling != 1.0:
        weights = bb.emit(op.multiply(weights, relax.const(r.scaling, dtype_of(weights))))
    if r.capacity_factor is not None or r.capacity:
        weights, ids = apply_capacity(bb, weights, ids, spec, rows)
    return weights, ids


def pick(bb, probs, choice, k: int, renorm_eps: float | None):
    """ids = top-k of choice (best first); weights = probs at ids [/ (Σ + eps) unless eps is None]."""
    _, ids = topk(bb, choice, k)                                          # [T, k]
    weights = bb.emit(op.gather_elements(probs, ids, axis=1))
    if renorm_eps is None:
        return weights, ids
    total = bb.emit(op.sum(weights, axis=-1, keepdims=True))              # [T, 1]
    if renorm_eps:
        total = bb.emit(op.add(total, relax.const(renorm_eps, dtype_of(weights))))
    return bb.emit(op.divide(weights, total)), ids


def group_limit(bb, choice, spec: MoESpec, group_scores=None):
    """[T, E] -> [T, E], experts outside each token's topk_groups best groups set to -inf."""
    r, E, G = spec.router, spec.num_experts, spec.router.n_groups
    T = dims(choice)[0]
    grouped = bb.emit(op.reshape(choice, (T, G, E // G)))                # [T, G, E/G]
    if group_scores is None and r.group_score == "max":
        group_scores = bb.emit(op.max(grouped, axis=-1))                  # [T, G]
    elif group_scores is None:
        top2, _ = topk(bb, grouped, min(2, E // G))
        group_scores = bb.emit(op.sum(top2, axis=-1))
    _, group_ids = topk(bb, group_scores, r.topk_groups)                  # [T, g]
    keep = mask_of(bb, group_ids, G, dtype_of(choice))                     # [T, G]
    keep = bb.emit(op.reshape(op.broadcast_to(op.expand_dims(keep, -1), (T, G, E // G)), (T, E)))
    dt = dtype_of(choice)
    return bb.emit(op.where(op.equal(keep, relax.const(0.0, dt)), relax.const(float("-inf"), dt), choice))


def hierarchical_probs(bb, logits, spec: MoESpec):
    """[T, G+E] -> p [T, E] = softmax(group logits)[g(e)] * softmax(expert logits in g(e)), and [T, G]."""
    E, G = spec.num_experts, spec.router.n_groups
    T, L = dims(logits)
    if int(L) != G + E:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hierarchical routing needs G+E={G + E} "
                         f"logits (groups first), got {L}")
    group_logits = bb.emit(op.strided_slice(logits, [1], [0], [G]))        # [T, G]
    group_p = bb.emit(op.nn.softmax(group_logits, axis=-1))
    inner = bb.emit(op.reshape(op.strided_slice(logits, [1], [G], [G + E]), (T, G, E // G)))
    inner = bb.emit(op.nn.softmax(inner, axis=-1))                        # [T, G, E/G]
    probs = bb.emit(op.reshape(op.multiply(op.expand_dims(group_p, -1), inner), (T, E)))
    return probs, group_logits


def capacity_expr(tokens, spec: MoESpec, k: int, factor: float | None = None):
    """Slots per expert on a symbolic token count: the fixed capacity, else max(1, ceil(f·T·k/E)),
    in float64 and in the order Python evaluates it."""
    if spec.router.capacity and factor is None:
        return tirx.IntImm("int64", spec.router.capacity)
    factor = spec.router.capacity_factor if factor is None else factor
    slots = tirx.ceil(tirx.Cast("float64", tokens) * factor * float(k) / float(spec.num_experts))
    return tirx.max(tirx.Cast("int64", slots), tirx.IntImm("int64", 1))


def apply_capacity(bb, weights, ids, spec: MoESpec, rows):
    """Drop assignments past each expert's capacity, served slot-major (every token's 1st choice, then
    2nd, ...); capacity_per_row: each of the R rows of x has its own queues."""
    T, k = dims(ids)
    E, k = spec.num_experts, int(k)
    R, S = rows if spec.router.capacity_per_row and rows[1] is not None else (1, T)
    flat = bb.emit(op.reshape(op.permute_dims(op.reshape(ids, (R, S, k)), [0, 2, 1]), (R, k * S)))
    valid = bb.emit(op.astype(op.greater_equal(flat, relax.const(0, "int64")), "int64"))   # [R, kS]
    onehot = bb.emit(op.multiply(op.one_hot(op.multiply(flat, valid), prim(1, "int64"), prim(0, "int64"), E),
                                 op.expand_dims(valid, -1)))                       # [R, kS, E]
    position = bb.emit(op.sum(op.multiply(op.cumsum(onehot, axis=1, dtype="int64"), onehot), axis=-1))
    keep = bb.emit_te(lambda p, v: te.compute(p.shape, lambda i, j: tirx.all(
        p[i, j] - 1 < capacity_expr(p.shape[1] // k, spec, k), v[i, j] > 0), name="under_capacity"),
        position, valid, primfunc_name_hint="under_capacity")            # [R, kS]
    keep = bb.emit(op.reshape(op.permute_dims(op.reshape(keep, (R, k, S)), [0, 2, 1]), (T, k)))
    weights = bb.emit(op.multiply(weights, op.astype(keep, dtype_of(weights))))
    return weights, bb.emit(op.where(keep, ids, relax.const(-1, "int64")))


def expert_choice(bb, logits, spec: MoESpec):
    """Each expert takes its top-C tokens by softmax score, C = min(T, ceil(cf * T / E)) from symbolic T."""
    E, r = spec.num_experts, spec.router
    cf = r.capacity_factor or float(spec.top_k)
    probs = bb.emit(op.nn.softmax(logits, axis=-1))                       # [T, E]
    order = bb.emit(op.argsort(probs, axis=0, descending=True, dtype="int64"))   # [T, E] tokens by score
    rank = bb.emit(op.argsort(order, axis=0, dtype="int64"))             # [T, E] rank of token t for e

    def picked(rank_t, probs_t):
        T = rank_t.shape[0]
        cap = tirx.min(capacity_expr(T, spec, 1, cf), T)
        return (te.compute(rank_t.shape, lambda t, e: tirx.Select(
                    rank_t[t, e] < cap, probs_t[t, e] * tirx.const(r.scaling, probs_t.dtype),
                    tirx.const(0.0, probs_t.dtype)), name="ec_weights"),
                te.compute(rank_t.shape, lambda t, e: tirx.Select(
                    rank_t[t, e] < cap, tirx.Cast("int64", e), tirx.IntImm("int64", -1)), name="ec_ids"))

    both = bb.emit_te(picked, rank, probs, primfunc_name_hint="expert_choice_pick")
    return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))


def hashed(bb, logits, spec: MoESpec, token_ids):
    """token id -> k distinct experts: ((id * HASH_MULT) mod 2^31 + j) mod E; weights 1/k."""
    if token_ids is None:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hash routing needs token ids, but the layer "
                         f"has none (the model's input has no token ids reaching this layer)")
    T = dims(logits)[0]
    k, E = spec.top_k, spec.num_experts
    tid = bb.emit(op.reshape(op.astype(token_ids, "int64"), (T, 1)))
    base = bb.emit(op.floor_mod(op.multiply(tid, relax.const(HASH_MULT, "int64")),
                                relax.const(2 ** 31, "int64")))           # [T, 1]
    ids = bb.emit(op.floor_mod(op.add(base, op.arange(0, k, dtype="int64")), relax.const(E, "int64")))
    weights = bb.emit(op.full((T, k), relax.const(1.0 / k, dtype_of(logits)), dtype=dtype_of(logits)))
    return weights, ids
