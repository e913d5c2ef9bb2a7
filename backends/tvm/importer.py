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

from .aten import EXTRA, FIXES, with_scalar_tensors

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
    """A result whose shape TVM lost or left unsimplified (T.min(1, s) with s >= 1 unknown to it) gets
    torch's own shape for the node, written with the importer's symbols (a checked match_cast)."""
    ty = getattr(out, "ty", None)
    if not isinstance(ty, relax.TensorType) or (ty.shape is not None and not any(
            _min_max(d) for d in ty.shape.values)):
        return out
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != ty.ndim:
        return out
    symbols = {v.name: v for var in importer.env.values() if isinstance(getattr(var, "ty", None), relax.TensorType)
               and var.ty.shape is not None for v in var.ty.shape.values if isinstance(v, tirx.Var)}
    dims = [symbolic(d, symbols) for d in val.shape]
    if any(d is None for d in dims):
        return out
    return importer.block_builder.match_cast(out, relax.TensorType(dims, str(ty.dtype)))


def _min_max(e) -> bool:
    """Whether a shape expression holds a T.min / T.max anywhere (TVM could not simplify it: a later
    broadcast or reshape cannot prove it equal to anything)."""
    if isinstance(e, (tirx.Min, tirx.Max)):
        return True
    parts = [getattr(e, a) for a in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(e, a)]
    return any(_min_max(p) for p in list(parts) + list(getattr(e, "args", None) or []))


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
