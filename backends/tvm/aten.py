"""Generic ATen translations for TVM 0.27's PyTorch importer, used by importer.guarded: fixes of its
own translations on dynamic shapes and dtypes (FIXES, by the name of the translation they replace) and
translations it lacks (EXTRA). No MoE or router code: routing reaches TVM as these ordinary ops.

    FIXES   reshape/view   identity check compares symbolic dims with `==` (raises)  ->  reshape directly
            cumsum         bool/int input without dtype stays bool (torch: int64); unknown-shape input
                           fails in DispatchSortScan  ->  dtype int64, shape made symbolic by match_cast
            slice          a negative dim reaches strided_slice as is (fails in legalization)  ->  dim + rank;
                           bounds provably inside the dim  ->  assume_inbound (no T.min/T.max shapes)
            empty          symbolic sizes reach ShapeExpr as Python objects  ->  PrimExprs
            topk           a symbolic k (expert choice's capacity)  ->  descending argsort, first k;
                           bfloat16 input (TVM orders it wrongly)  ->  topk in float32 (exact);
                           sorted=False (TVM refuses it; torch leaves the order open)  ->  sorted
            constant_pad_nd  symbolic widths (relax pads by static ones)  ->  crop + concatenated blocks
                           (a width provably ≥ 0, a pad to a multiple: the block alone)
            clamp          a missing bound becomes ±inf, which an integer tensor cannot hold  ->  max/min
            masked_fill, full_like   full_like(x, value) fails to legalize  ->  where / broadcast_to
            div            floor division of an int64 tensor by a Python int (an int32 constant)  ->
                           the constant in the tensor's dtype
    EXTRA   amax, t, where with a scalar; math.ceil / sym_float / truediv / sym_max / sym_min /
            sym_numel on symbolic sizes (PrimExprs in, PrimExpr out)
    with_scalar_tensors   a symbolic scalar (SymInt/SymFloat) beside a tensor  ->  a 0-d tensor
"""
from __future__ import annotations

import math
import types
import weakref

import torch
import tvm
from tvm import relax, te, tirx


def reshape(node, importer, original):
    """aten.view/reshape without the identity check that breaks on symbolic dims."""
    args = importer.retrieve_args(node)
    dims = args[1] if isinstance(args[1], (torch.Size, tuple, list)) else args[1:]
    return importer._emit_torch_reshape(args[0], dims)


def cumsum(node, importer, original):
    """aten.cumsum with torch's dtype rule (integral/bool -> int64) and a symbolic shape for the scan."""
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.kwargs.get("dtype")
    in_dtype = str(x.ty.dtype)
    if dtype is not None:
        dtype = importer._convert_data_type(str(dtype), importer.env)
    elif in_dtype == "bool" or in_dtype.startswith(("int", "uint")):
        dtype = "int64"
    if x.ty.shape is None:                                  # rank known, dims not: bind fresh symbols
        dims = [tirx.Var(f"{node.name}_d{i}", "int64") for i in range(x.ty.ndim)]
        x = bb.match_cast(x, relax.TensorType(dims, in_dtype))
    return bb.emit(relax.op.cumsum(x, dim, dtype))


def slice_(node, importer, original):
    """aten.slice with a negative dim made positive (strided_slice wants axes >= 0)."""
    dim = node.args[1] if len(node.args) > 1 else 0
    if isinstance(dim, int) and dim < 0:
        args = list(node.args)
        args[1] = dim + importer.env[node.args[0]].ty.ndim
        node = _with_args(node, args)
    inbound = _inbound_slice(node, importer)
    return original(node) if inbound is None else inbound


OPEN_END = 2 ** 62       # torch writes an open slice end as 2^63 - 1 (TVM's analyzer proves nothing about it
                         # beside a symbolic size): ends from here on are the axis size


def _inbound_slice(node, importer):
    """A unit-step slice whose 0 <= start <= end <= size TVM can prove: strided_slice with
    assume_inbound, so its dim is end - start (the importer's clamps leave T.min/T.max of symbols,
    which later passes cannot compare and TVM 0.27's KillAfterLastUse recursed forever on)."""
    x = importer.env[node.args[0]]
    a = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = (a[1] or 0), a[2], a[3], (1 if a[4] is None else a[4])
    if step != 1 or not isinstance(dim, int) or x.ty.shape is None:
        return None
    size = x.ty.shape[dim]
    start = prim_expr(0 if start is None else scalar(importer, start))
    end = scalar(importer, end)
    end = size if end is None or (isinstance(end, int) and end >= OPEN_END) else prim_expr(end)
    zero = tirx.IntImm("int64", 0)
    if provable([start < zero], node):              # x[:, -k:] and x[:, :-1]: from the end, as torch counts
        start = start + size
    if provable([end < zero], node):
        end = end + size
    if not (provable([start >= zero, start <= end, end <= size], node) or _torch_inbound(node, dim, start, end)):
        return None
    if provable([start == zero, end == size], node):
        return x
    return importer.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [end], assume_inbound=True))


def _torch_inbound(node, dim, start, end) -> bool:
    """Whether torch's own result for the slice is end - start long (a number, or the size S of [:S]):
    torch found the bounds in range (its export asserts what it assumed), where TVM cannot prove it (end ≤ P // (P // 8))."""
    val = node.meta.get("val")
    length = val.shape[dim] if isinstance(val, torch.Tensor) and val.dim() > dim else None
    if not isinstance(start, tirx.IntImm) or int(start) < 0:
        return False
    if isinstance(length, int):
        return isinstance(end, tirx.IntImm) and length == int(end) - int(start)
    return int(start) == 0 and isinstance(end, tirx.Var) and isinstance(length, torch.SymInt) \
        and str(length.node.expr) == end.name                     # [:S] is S long: S ≤ the padded P


def empty(node, importer, original):
    """aten.empty(sizes) with symbolic sizes: zeros of the PrimExpr shape (contents are unspecified)."""
    dtype = importer._convert_data_type(node.kwargs.get("dtype") or torch.get_default_dtype(), importer.env)
    sizes = [prim_expr(importer.env[d] if isinstance(d, torch.fx.Node) else d) for d in node.args[0]]
    return importer.block_builder.emit(relax.op.zeros(relax.ShapeExpr(sizes), dtype))


def prim_expr(value):
    if isinstance(value, int):
        return tirx.IntImm("int64", value)
    inner = getattr(value, "value", None)                   # a relax PrimValue wrapping a PrimExpr
    return inner if inner is not None and not isinstance(value, tirx.IntImm) else value


def _with_args(node, args):
    """A stand-in for `node` with other positional args (the graph itself is left untouched)."""
    return types.SimpleNamespace(name=node.name, target=node.target, args=tuple(args), kwargs=node.kwargs,
                                 meta=node.meta, op=node.op)


def topk(node, importer, original):
    """aten.topk, (1) with a symbolic k (expert choice's capacity): descending argsort along dim, its
    first k; (2) on bfloat16, in float32 (exact): TVM 0.27's topk orders bfloat16 values wrongly;
    (3) sorted=False (order unspecified; TVM refuses it): sorted, one valid order."""
    args = importer.retrieve_args(node)
    x, k = args[0], args[1] if len(args) > 1 else node.kwargs.get("k", 1)
    bf16 = str(x.ty.dtype) == "bfloat16"
    in_order = args[4] if len(args) > 4 else node.kwargs.get("sorted", True)
    if isinstance(k, (int, tirx.IntImm)) and not bf16 and in_order:
        return original(node)
    bb = importer.block_builder
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", -1)
    largest = args[3] if len(args) > 3 else node.kwargs.get("largest", True)
    dim = dim + x.ty.ndim if dim < 0 else dim
    data = bb.emit(relax.op.astype(x, "float32")) if bf16 else x
    if isinstance(k, (int, tirx.IntImm)):
        both = bb.emit(relax.op.topk(data, k, axis=dim, largest=largest, ret_type="both", dtype="int64"))
        values, ids = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
    else:
        order = bb.emit(relax.op.argsort(data, axis=dim, descending=largest, dtype="int64"))
        ids = bb.emit(relax.op.strided_slice(order, [dim], [0], [scalar(importer, k)]))
        values = bb.emit(relax.op.gather_elements(data, ids, axis=dim))
    if bf16:
        values = bb.emit(relax.op.astype(values, "bfloat16"))
    return bb.emit(relax.Tuple([values, ids]))


def constant_pad_nd(node, importer, original):
    """aten.constant_pad_nd with symbolic widths (a causal conv's state padded by `kernel - seq`, which
    crops when negative): per padded dim, x cropped by max(-w, 0) and a block of max(w, 0) values
    concatenated on that side (relax's pad takes static, non-negative widths only)."""
    pad = [scalar(importer, p) for p in node.args[1]]
    if all(isinstance(p, int) and p >= 0 for p in pad):
        return original(node)
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    return _pad_constant(node, importer, pad, value)


def pad(node, importer, original):
    """aten.pad in constant mode with symbolic widths: as constant_pad_nd."""
    pad = [scalar(importer, p) for p in node.args[1]]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if mode != "constant" or all(isinstance(p, int) and p >= 0 for p in pad):
        return original(node)
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
    return _pad_constant(node, importer, pad, value)


def _pad_constant(node, importer, pad, value):
    bb, x = importer.block_builder, importer.env[node.args[0]]
    dt = str(x.ty.dtype)
    if x.ty.shape is None:                                  # rank known, dims not: bind fresh symbols
        x = bb.match_cast(x, relax.TensorType([tirx.Var(f"{node.name}_d{i}", "int64")
                                                for i in range(x.ty.ndim)], dt))
    for i in range(0, len(pad), 2):
        dim = x.ty.ndim - 1 - i // 2
        for side, w in (("before", pad[i]), ("after", pad[i + 1])):
            w = prim_expr(w)
            grow, crop = _sides(w)
            n = x.ty.shape[dim]
            if crop is not None:
                x = bb.emit(relax.op.strided_slice(x, [dim], [crop], [n]) if side == "before"
                            else relax.op.strided_slice(x, [dim], [0], [n - crop]))
            if grow is None:
                continue
            shape = list(x.ty.shape)
            shape[dim] = grow
            block = bb.emit(relax.op.full(relax.ShapeExpr(shape), relax.const(value or 0.0, dt), dt))
            x = bb.emit(relax.op.concat([block, x] if side == "before" else [x, block], axis=dim))
    return x


def _sides(w):
    """(grow, crop) of a pad width w: max(w, 0) and max(-w, 0), None where provably 0. A width that
    is provably ≥ 0 (a pad to a multiple, `(C - S % C) % C`) grows by w itself: no T.max enters the
    shapes (TVM 0.27 cannot compare T.max shapes, and its KillAfterLastUse recursed forever on them)."""
    zero = tirx.IntImm("int64", 0)
    if provable([w >= zero]):
        return (None if provable([w == zero]) else w), None
    if provable([w <= zero]):
        return None, -w
    return tirx.max(w, zero), tirx.max(-w, zero)


def provable(conditions: list, node=None) -> bool:
    """Whether TVM's analyzer proves every condition over sizes: each symbol in them taken as ≥ 0, and
    within the range torch's export gave it (`node`'s shape environment: S ≤ 64 where the export
    unrolled one 64-token chunk)."""
    from contextlib import ExitStack
    from tvm.sym.analyzer import Analyzer
    conditions = [tirx.const(c, "bool") if isinstance(c, bool) else c for c in conditions]
    analyzer, known = Analyzer(), ranges(node)
    with ExitStack() as scopes:
        names = {}
        for c in conditions:
            names.update({v.name: v for v in tirx.analysis.undefined_vars(c)})
        for name, v in names.items():
            lo, hi = known.get(name, (0, None))
            dt = str(v.ty.dtype)
            scopes.enter_context(analyzer.constraint_scope(v >= tirx.IntImm(dt, max(lo, 0))))
            if hi is not None:
                scopes.enter_context(analyzer.constraint_scope(v <= tirx.IntImm(dt, hi)))
        return all(analyzer.can_prove(c) for c in conditions)


def ranges(node) -> dict:
    """{symbol name: (lower, upper or None)} of the sizes torch's export bounded (range constraints and
    guards), read from the shape environment of `node`'s fake tensors; {} without one."""
    vals = [getattr(node, "meta", {}).get("val")] + [getattr(a, "meta", {}).get("val") for a in
                                                      getattr(node, "args", ()) if isinstance(a, torch.fx.Node)]
    for val in vals:
        for d in getattr(val, "shape", ()):
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                cached = _RANGES.get(env)
                if cached is None or cached[0] != len(env.var_to_range):    # one dict per program
                    cached = _RANGES[env] = (len(env.var_to_range), {
                        str(k): (_finite(r.lower) or 0, _finite(r.upper)) for k, r in env.var_to_range.items()})
                return cached[1]
    return {}


_RANGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # ShapeEnv -> (symbols, ranges)


def _finite(bound):
    """A sympy range bound as an int; None for ±∞ (torch's int_oo claims is_finite)."""
    from torch.utils._sympy.numbers import int_oo
    return None if bound in (int_oo, -int_oo) or not bound.is_finite else int(bound)


def clamp(node, importer, original):
    """aten.clamp with scalar bounds: max/min with constants of x's dtype (TVM's clip takes ±inf for a
    missing bound, which an integer tensor cannot hold)."""
    args = importer.retrieve_args(node)
    lo = args[1] if len(args) > 1 else node.kwargs.get("min")
    hi = args[2] if len(args) > 2 else node.kwargs.get("max")
    if any(isinstance(b, relax.Expr) for b in (lo, hi)):
        return original(node)
    x, bb = args[0], importer.block_builder
    if lo is not None:
        x = bb.emit(relax.op.maximum(x, relax.const(lo, str(x.ty.dtype))))
    if hi is not None:
        x = bb.emit(relax.op.minimum(x, relax.const(hi, str(x.ty.dtype))))
    return x


def masked_fill(node, importer, original):
    """aten.masked_fill with a scalar: where(mask, constant, x) (TVM 0.27's full_like fails to legalize)."""
    args = importer.retrieve_args(node)
    x, mask, value = args[:3]
    if not isinstance(value, (int, float, bool)):
        return original(node)
    dtype = str(node.meta["val"].dtype).removeprefix("torch.") if "val" in node.meta else str(x.ty.dtype)
    x = x if str(x.ty.dtype) == dtype else importer.block_builder.emit(relax.op.astype(x, dtype))
    return importer.block_builder.emit(relax.op.where(mask, relax.const(value, dtype), x))


def full_like(node, importer, original):
    """aten.full_like with a scalar: the constant broadcast to x's shape (full_like fails to legalize)."""
    args = importer.retrieve_args(node)
    x, value = args[:2]
    if not isinstance(value, (int, float, bool)) or "val" not in node.meta:
        return original(node)
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    return importer.block_builder.emit(relax.op.broadcast_to(relax.const(value, dtype), x.ty.shape))


def div(node, importer, original):
    """div.Tensor_mode(x, number, rounding_mode): the number as a constant of x's dtype (TVM makes an int
    an int32 constant, which floor_divide refuses beside an int64 tensor: Llama 4's attention chunks)."""
    x = importer.env.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    b = node.args[1] if len(node.args) > 1 else None
    dtype = str(getattr(getattr(x, "ty", None), "dtype", ""))
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    if not dtype or isinstance(b, bool) or not isinstance(b, (int, float)) or mode != "floor" \
            or (isinstance(b, float) and "int" in dtype):
        return original(node)
    return importer.block_builder.emit(relax.op.floor_divide(x, relax.const(b, dtype)))


def slice_scatter(node, importer, original):
    """slice_scatter (what functionalization makes of `y[..., a:b] = src`) where TVM 0.27's legalization
    fails, on an axis whose size is not a constant (it wants one): over the whole axis at unit step,
    src itself; else where(a ≤ i < b on the step, take(src, (i - a) // step), y) along the axis."""
    args = importer.retrieve_args(node)
    x, src = args[:2]
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    start = args[3] if len(args) > 3 else node.kwargs.get("start", 0)
    end = args[4] if len(args) > 4 else node.kwargs.get("end")
    step = args[5] if len(args) > 5 else node.kwargs.get("step", 1)
    shape = getattr(x.ty, "shape", None)
    if shape is None or getattr(src.ty, "shape", None) is None or x.ty.ndim != src.ty.ndim \
            or str(x.ty.dtype) != str(src.ty.dtype) or not all(isinstance(v, int) for v in (dim, start, step)) \
            or not (end is None or isinstance(end, int)) or start < 0 or step < 1 or (end is not None and end < 0):
        return original(node)
    axis = dim % x.ty.ndim
    size = shape.values[axis]
    if isinstance(size, tirx.IntImm):
        return original(node)
    end = size if end is None or end >= OPEN_END else prim_expr(end)
    if start == 0 and step == 1 and provable([end >= size], node) and \
            provable([tirx.EQ(a, b) for a, b in zip(shape.values, src.ty.shape.values)], node):
        return src
    bb, op, i64 = importer.block_builder, relax.op, "int64"
    i = bb.emit(op.arange(tirx.IntImm(i64, 0), size, tirx.IntImm(i64, 1), i64))               # [size]
    rel = bb.emit(op.subtract(i, relax.const(start, i64)))
    inside = bb.emit(op.logical_and(op.greater_equal(rel, relax.const(0, i64)), op.less(i, _size_tensor(bb, end))))
    if step != 1:
        inside = bb.emit(op.logical_and(inside, op.equal(op.floor_mod(rel, relax.const(step, i64)),
                                                         relax.const(0, i64))))
    picked = bb.emit(op.take(src, bb.emit(op.floor_divide(rel, relax.const(step, i64))), axis, mode="clip"))
    along = [tirx.IntImm(i64, 1)] * x.ty.ndim
    along[axis] = size
    return bb.emit(op.where(bb.emit(op.reshape(inside, along)), picked, x))


def cat(node, importer, original):
    """aten.cat without its empty operands (a DeepSeek-V4 cache of 0 compressed keys beside the keys):
    TVM 0.27's RewriteDataflowReshape turns the expand_dims of a [B, 0, D] tensor into an undefined
    variable. torch's meta says which operands are empty along the axis (a static 0)."""
    tensors = node.args[0]
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    empty = [isinstance(t, torch.fx.Node) and isinstance(t.meta.get("val"), torch.Tensor)
             and t.meta["val"].dim() > 0 and isinstance(t.meta["val"].shape[axis], int)
             and t.meta["val"].shape[axis] == 0 for t in tensors]
    kept = [t for t, e in zip(tensors, empty) if not e]
    if not any(empty) or not kept:
        return original(node)
    if len(kept) == 1:
        return importer.env[kept[0]]
    return importer.block_builder.emit(relax.op.concat([importer.env[t] for t in kept], axis=axis))


def _size_tensor(bb, size):
    """A size (PrimExpr) as a [1] int64 tensor, to compare index tensors with."""
    if isinstance(size, tirx.IntImm):
        return relax.const([int(size)], "int64")
    return bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([size])))


FIXES = {"_div": div, "_reshape": reshape, "_cumsum": cumsum, "_slice": slice_, "_empty": empty, "_topk": topk,
         "_clamp": clamp, "_constant_pad_nd": constant_pad_nd, "_pad": pad, "_masked_fill": masked_fill, "_full_like": full_like,
         "_slice_scatter": slice_scatter, "_cat": cat}


# ---------------------------------------------------------------- symbolic scalars


def scalar(importer, value):
    """An fx arg's value as a Python number or a PrimExpr (a static size may be a 0-d relax constant)."""
    value = importer.env[value] if isinstance(value, torch.fx.Node) else value
    if isinstance(value, tvm.ir.GenericConst) and not value.ty.ndim:     # relax.const
        return value.data.numpy().item()
    if isinstance(value, (tirx.IntImm, tirx.FloatImm)):
        return value.value
    return value


def is_symbolic(value) -> bool:
    """A PrimExpr (a tirx Var or an expression of them), not a constant."""
    return isinstance(getattr(value, "ty", None), tvm.ir.PrimType) and \
        not isinstance(value, (tirx.IntImm, tirx.FloatImm))


def with_scalar_tensors(node, importer):
    """A symbolic scalar argument of a tensor op (position < capacity) as a 0-d tensor of the dtype
    torch gives it beside the op's tensors (a scalar does not promote a tensor of its own kind)."""
    env = importer.env
    values = [env.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args]
    tensors = [v for v in values if isinstance(getattr(v, "ty", None), relax.TensorType)]
    if not tensors or not any(is_symbolic(v) for v in values):
        return node
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node
    kinds = [str(a.type) for a in schema.arguments]
    other = str(tensors[0].ty.dtype)
    args = list(node.args)
    for i, v in enumerate(values):
        if is_symbolic(v) and i < len(kinds) and ("Scalar" in kinds[i] or "Tensor" in kinds[i]):
            floaty = other.startswith(("float", "bfloat"))
            dtype = other if floaty or "int" in str(v.ty.dtype) else "float32"
            args[i] = importer.block_builder.emit_te(
                lambda: te.compute((), lambda: tirx.Cast(dtype, v), name="scalar"),
                primfunc_name_hint="symbolic_scalar")
    return _with_args(node, args)


def _sym(fn):
    """A translation of a Python/torch function on symbolic sizes: PrimExprs in, a PrimExpr out."""
    def convert(node, importer):
        return fn(*[scalar(importer, a) for a in node.args])
    return convert


def _ceil(v):
    if not is_symbolic(v):
        return math.ceil(v)
    return tirx.Cast("int64", tirx.ceil(v if "float" in str(v.ty.dtype) else tirx.Cast("float64", v)))


def _float(v):
    return tirx.Cast("float64", v) if is_symbolic(v) else float(v)


def _truediv(a, b):
    return a / b if not (is_symbolic(a) or is_symbolic(b)) else _float(a) / _float(b)


def _minmax(name):
    def fn(a, b):
        if not (is_symbolic(a) or is_symbolic(b)):
            return min(a, b) if name == "min" else max(a, b)
        as_expr = [x if is_symbolic(x) else tirx.IntImm("int64", x) if isinstance(x, int) else
                   tirx.FloatImm("float64", x) for x in (a, b)]
        return (tirx.min if name == "min" else tirx.max)(*as_expr)
    return fn


def _numel(node, importer):
    x = importer.env[node.args[0]]
    return math.prod(x.ty.shape.values) if x.ty.ndim else tirx.IntImm("int64", 1)


def _amax(node, importer):
    """aten.amax(x, dim=(), keepdim=False): the max over dim (all dims when empty)."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    axis = None if dim in ((), [], None) else ([dim] if isinstance(dim, int) else list(dim))
    return importer.block_builder.emit(relax.op.max(x, axis=axis, keepdims=keep))


def _t(node, importer):
    """aten.t: transpose a 2-D tensor (0-D and 1-D as they are)."""
    x = importer.env[node.args[0]]
    return x if x.ty.ndim < 2 else importer.block_builder.emit(relax.op.permute_dims(x, [1, 0]))


def _where_scalar(node, importer):
    """aten.where.ScalarOther/ScalarSelf/Scalar: a scalar branch is a constant of the other's dtype."""
    cond, a, b = (importer.env[v] if isinstance(v, torch.fx.Node) else v for v in node.args[:3])
    tensor = a if isinstance(a, relax.Expr) else b if isinstance(b, relax.Expr) else None
    dtype = str(tensor.ty.dtype) if tensor is not None else str(node.meta["val"].dtype).removeprefix("torch.")
    a, b = (v if isinstance(v, relax.Expr) else relax.const(v, dtype) for v in (a, b))
    return importer.block_builder.emit(relax.op.where(cond, a, b))


EXTRA = {
    "amax.default": _amax, "t.default": _t,
    "where.ScalarOther": _where_scalar, "where.ScalarSelf": _where_scalar, "where.Scalar": _where_scalar,
    "ceil": _sym(_ceil), "sym_float": _sym(_float), "truediv": _sym(_truediv),
    "sym_max": _sym(_minmax("max")), "sym_min": _sym(_minmax("min")), "sym_numel.default": _numel,
}
