"""TVM's PyTorch importer, guarded: every translation names its fx node when it fails, and the gaps of
apache-tvm 0.27's translations (dynamic shapes, dtypes, symbolic sizes) are closed by aten.py.

    from_exported_program(custom_convert_map=guarded({"experts.default": lower_experts}))
      every op name the importer knows  ->  its own translation (or aten.FIXES'), wrapped
      ops it lacks                      ->  aten.EXTRA
      any op   a result shape lost or left as T.min/T.max of symbols  ->  torch's shape (match_cast)
               a result dtype other than torch's (zeros_like(x, dtype=bool) made float)  ->  astype

bounded_takes(mod): every `take` (embedding, index_select, index) gathers in "clip" mode: TVM's
default "fast" mode reads out of bounds for an index outside the table (a token id ≥ vocab, < 0).
"""
from __future__ import annotations

import torch
import tvm
from tvm import relax, tirx

from moecc.errors import MoeccError

from .aten import EXTRA, FIXES, ranges, with_scalar_tensors

ORIGINALS = "_moecc_originals"


def guarded(custom: dict) -> dict:
    """A custom_convert_map covering every op the importer knows (wrapped) plus `custom` (named)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
    table = {name: wrap(name) for name in ExportedProgramImporter().convert_map if isinstance(name, str)}
    table.update({name: named(fn) for name, fn in {**EXTRA, **custom}.items()})
    return table


def originals(importer) -> dict:
    """The importer's own translations (its convert_map now holds ours)."""
    if not hasattr(importer, ORIGINALS):
        setattr(importer, ORIGINALS, importer.create_convert_map())
    return getattr(importer, ORIGINALS)


def wrap(name: str):
    def convert(node, importer):
        original = originals(importer)[name]
        fix = FIXES.get(getattr(original, "__name__", ""))
        node = with_scalar_tensors(node, importer)
        if name in BROADCASTING:
            agree_operands(node, importer)
        elif name == "expand.default":
            agree_expanded(node, importer)
        out = named(lambda n, imp: fix(n, imp, original) if fix else original(n))(node, importer)
        return repair_dtype(node, importer, repair_shape(node, importer, out))
    return convert


def repair_dtype(node, importer, out):
    """A tensor result of another dtype than torch's (zeros_like(x, dtype=bool) made float) -> astype."""
    val = node.meta.get("val")
    ty = getattr(out, "ty", None)
    if not isinstance(val, torch.Tensor) or not isinstance(ty, relax.TensorType):
        return out
    want = str(val.dtype).removeprefix("torch.")
    return out if str(ty.dtype) == want else importer.block_builder.emit(relax.op.astype(out, want))


def repair_shape(node, importer, out):
    """A result whose shape TVM lost or left unsimplified (T.min(1, s) with s >= 1 unknown to it), or
    left symbolic where torch's size is one number over the range the export allowed (a padded
    length's chunk count (S + pad) // 64 is 1, and P // (P // 64) is 64, for every S ≤ 64), gets
    torch's own shape for the node, written with the importer's symbols (a checked match_cast)."""
    ty = getattr(out, "ty", None)
    val = node.meta.get("val")
    if not isinstance(ty, relax.TensorType) or not isinstance(val, torch.Tensor) or val.dim() != ty.ndim:
        return out
    known = ranges(node)
    sizes = [constant(d, known) for d in val.shape]
    ours = list(ty.shape.values) if ty.shape is not None else [None] * len(sizes)
    lost = [d is None or _opaque(d) or (isinstance(t, int) and not isinstance(d, tirx.IntImm))
            for d, t in zip(ours, sizes)]
    if not any(lost):
        return out
    symbols = _symbols(importer)
    dims = [symbolic(t, symbols) if bad else d for d, t, bad in zip(ours, sizes, lost)]
    if any(d is None for d in dims):
        return out
    return importer.block_builder.match_cast(out, relax.TensorType(dims, str(ty.dtype)))


_CONSTANT: dict = {}
MAX_POINTS = 4096            # sizes enumerated over at most this many values of their symbols


def constant(size, known: dict):
    """A torch size as an int where it is one: a SymInt of one value at every point of the ranges
    `known` of its symbols (≤ MAX_POINTS points), or, of one unbounded symbol, at the MAX_POINTS first
    values of its range (the padded P // (P // 64) is 64 for every S; torch and TVM cannot simplify
    it). The caller's match_cast checks the number at run time: a size that is not one fails there."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr
    key = (expr, tuple(sorted((str(s), known.get(str(s))) for s in expr.free_symbols)))
    if key not in _CONSTANT:
        _CONSTANT[key] = _one_value(expr, known)
    return size if _CONSTANT[key] is None else _CONSTANT[key]


def _one_value(expr, known: dict):
    import itertools
    import math
    symbols = sorted(expr.free_symbols, key=str)
    spans = [known.get(str(s), (0, None)) for s in symbols]
    if len(spans) == 1 and spans[0][1] is None:
        spans = [(spans[0][0], spans[0][0] + MAX_POINTS - 1)]
    if not symbols or any(hi is None for _, hi in spans) or \
            math.prod(hi - lo + 1 for lo, hi in spans) > MAX_POINTS:
        return None
    values = set()
    for point in itertools.product(*(range(lo, hi + 1) for lo, hi in spans)):
        v = expr.xreplace(dict(zip(symbols, point)))
        if not (isinstance(v, int) or getattr(v, "is_Integer", False)) or (values and int(v) not in values):
            return None
        values.add(int(v))
    return values.pop()


BROADCASTING = {f"{op}.{kind}" for op in ("add", "sub", "mul", "div", "maximum", "minimum", "pow", "eq", "ne",
                                           "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and",
                                           "bitwise_or", "remainder", "floor_divide")
                for kind in ("Tensor", "default")} | {"where.self"}


def agree_operands(node, importer) -> None:
    """The tensor operands of a broadcasting op, where TVM cannot prove two of their dims equal (a
    padded length's P // (P // 64) beside a 64: torch asserted them equal when it exported), are
    match_cast to one shape: per dim, a static size torch knows for any of them, else torch's
    result dim. Their env entries are replaced, so later users see the agreed shape too."""
    val = node.meta.get("val")
    args = [a for a in node.args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
            and isinstance(getattr(importer.env.get(a), "ty", None), relax.TensorType)
            and importer.env[a].ty.shape is not None]
    if not isinstance(val, torch.Tensor) or len(args) < 2 or _agreeing([importer.env[a] for a in args]):
        return
    rank = val.dim()
    wanted = []
    for i in range(1, rank + 1):
        sizes = [a.meta["val"].shape[-i] for a in args if a.meta["val"].dim() >= i]
        sizes = [d for d in sizes if not (isinstance(d, int) and d == 1)]
        static = [d for d in sizes if isinstance(d, int)]
        wanted.append(static[0] if static else val.shape[-i])
    wanted.reverse()                                            # [rank] torch sizes, left to right
    from tvm.sym.analyzer import Analyzer
    analyzer, symbols = Analyzer(), _symbols(importer)
    for a in args:
        n, torch_dims = len(importer.env[a].ty.shape.values), a.meta["val"].shape
        want = [None if isinstance(t, int) and t == 1 else wanted[rank - n + j] for j, t in enumerate(torch_dims)]
        if not _cast_dims(importer, a, want, symbols, analyzer):
            return


def agree_expanded(node, importer) -> None:
    """The input of an expand whose dims TVM cannot prove 1 or the target size (a chunk count
    (S + pad) // 64 expanded to torch's 1: torch's export guarded S ≤ 64) is match_cast to the sizes
    torch has: 1 where torch expands to 1 or knows the input dim is 1, else the target size."""
    src, val = node.args[0], node.meta.get("val")
    var = importer.env.get(src) if isinstance(src, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(getattr(var, "ty", None), relax.TensorType) \
            or var.ty.shape is None or not isinstance(src.meta.get("val"), torch.Tensor):
        return
    from tvm.sym.analyzer import Analyzer
    torch_in, offset = src.meta["val"].shape, val.dim() - len(var.ty.shape.values)
    want = [1 if (isinstance(t, int) and t == 1) or (isinstance(o, int) and o == 1) else o
            for t, o in zip(torch_in, list(val.shape)[offset:])]
    _cast_dims(importer, src, want, _symbols(importer), Analyzer(), or_one=True)


def _cast_dims(importer, a, wanted: list, symbols: dict, analyzer, or_one: bool = False) -> bool:
    """match_cast env[a] so that each dim TVM cannot prove equal to its wanted torch size (None: kept;
    or_one: a dim TVM proves 1 is kept too) becomes that size; the env entry is replaced, so later users
    see the cast shape. False (nothing cast) where a wanted size has no TVM expression."""
    var = importer.env[a]
    new, changed = [], False
    for d, w in zip(var.ty.shape.values, wanted):
        if w is None:
            new.append(d)
            continue
        w = symbolic(w, symbols)
        if w is None:
            return False
        same = analyzer.can_prove_equal(d, w) or (or_one and analyzer.can_prove_equal(d, 1))
        changed |= not same
        new.append(d if same else w)
    if changed:
        importer.env[a] = importer.block_builder.match_cast(var, relax.TensorType(new, str(var.ty.dtype)))
    return True


def _agreeing(vars_) -> bool:
    """Whether TVM proves the operands' aligned dims equal (1s broadcast), as its broadcast check will."""
    from tvm.sym.analyzer import Analyzer
    analyzer, shapes = Analyzer(), [list(v.ty.shape.values) for v in vars_]
    for i in range(1, max(len(sh) for sh in shapes) + 1):
        dims = [sh[-i] for sh in shapes if len(sh) >= i and not (isinstance(sh[-i], tirx.IntImm) and sh[-i].value == 1)]
        if any(not analyzer.can_prove_equal(d, dims[0]) for d in dims[1:]):
            return False
    return True


def _symbols(importer) -> dict:
    return {v.name: v for var in importer.env.values() if isinstance(getattr(var, "ty", None), relax.TensorType)
            and var.ty.shape is not None for v in var.ty.shape.values if isinstance(v, tirx.Var)}


def _opaque(e) -> bool:
    """Whether a shape expression holds a T.min / T.max, or a division by a symbolic size, anywhere
    (TVM could not simplify it: a later broadcast or reshape cannot prove it equal to anything; a
    reshape's -1 inferred as P // (P // 64) for a padded length P is 64 to torch, not to TVM)."""
    if isinstance(e, (tirx.Min, tirx.Max)):
        return True
    if isinstance(e, (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod)) and not isinstance(e.b, tirx.IntImm):
        return True
    parts = [getattr(e, a) for a in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(e, a)]
    return any(_opaque(p) for p in list(parts) + list(getattr(e, "args", None) or []))


# torch's sympy functions of sizes (torch.utils._sympy.functions) -> tirx; sizes are ≥ 0, where C and
# Python modulo agree with floormod
_SYMPY_BINARY = {"FloorDiv": tirx.floordiv, "Mod": tirx.floormod, "PythonMod": tirx.floormod,
                 "Max": tirx.max, "Min": tirx.min}


def symbolic(size, symbols: dict):
    """A torch size (int or SymInt of symbols, +, *, //, %, max, min) -> PrimExpr over the importer's
    tirx.Vars, or None (a symbol the importer does not know, another function)."""
    import sympy
    if not isinstance(size, torch.SymInt):
        return tirx.IntImm("int64", int(size))

    def convert(e):
        if isinstance(e, sympy.Integer):
            return tirx.IntImm("int64", int(e))
        if isinstance(e, sympy.Symbol):
            return symbols.get(str(e))
        parts = [convert(a) for a in e.args]
        if any(p is None for p in parts) or not parts:
            return None
        binary = _SYMPY_BINARY.get(type(e).__name__)
        if binary is not None:
            acc = parts[0]
            for p in parts[1:]:                 # Max / Min may take more than two
                acc = binary(acc, p)
            return acc
        if not isinstance(e, (sympy.Add, sympy.Mul)):
            return None
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p if isinstance(e, sympy.Add) else acc * p
        return acc
    return convert(size.node.expr)


def named(fn):
    """Run a translation; any failure other than a MoeccError becomes one line naming the node."""
    def convert(node, importer):
        try:
            return fn(node, importer)
        except MoeccError:
            raise
        except Exception as e:
            where = (node.meta.get("stack_trace") or "").strip().splitlines()[-1:] or ["?"]
            raise MoeccError(f"TVM backend: TVM's importer cannot translate node {node.name!r} "
                             f"({node.target}): {type(e).__name__}: {message(e)} "
                             f"(source: {where[0].strip()})") from e
    return convert


def message(e: Exception) -> str:
    """The last non-empty line of an error (TVM puts its traceback first)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ---------------------------------------------------------------- bounds


def bounded_takes(mod):
    """Every relax `take` in "fast" mode (reads out of bounds on a bad index) -> "clip" mode."""
    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class Clip(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(take) and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = Clip().visit_expr(func)
    return mod
