"""TVM's PyTorch importer, guarded: every translation names its fx node when it fails, and gaps of
apache-tvm 0.27's translations on dynamic shapes are closed (hit by transformers' masking code).

    from_exported_program(custom_convert_map=guarded({"moe.default": lower_moe}))
      every op name the importer knows  ->  its own translation, wrapped
      reshape/view   identity check compares symbolic dims with `==` (raises)  ->  reshape directly
      cumsum         bool/int input without dtype stays bool (torch: int64); unknown-shape input
                     fails in DispatchSortScan  ->  dtype int64, shape made symbolic by match_cast
      slice          a negative dim reaches strided_slice as is (fails in legalization)  ->  dim + rank
      empty          symbolic sizes reach ShapeExpr as Python objects  ->  PrimExprs
      any op         a result shape lost or left as T.min/T.max of symbols  ->  torch's shape (match_cast)
"""
from __future__ import annotations

import types

import torch
from tvm import relax, tirx

from moecc.errors import MoeccError

ORIGINALS = "_moecc_originals"


def guarded(custom: dict) -> dict:
    """A custom_convert_map covering every op the importer knows (wrapped) plus `custom` (named)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
    table = {name: wrap(name) for name in ExportedProgramImporter().convert_map if isinstance(name, str)}
    table.update({name: named(fn) for name, fn in custom.items()})
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
        out = named(lambda n, imp: fix(n, imp, original) if fix else original(n))(node, importer)
        return repair_shape(node, importer, out)
    return convert


def repair_shape(node, importer, out):
    """A result whose shape TVM lost or left unsimplified (T.min(1, s) with s >= 1 unknown to it) gets
    torch's own shape for the node, written with the importer's symbols (a checked match_cast)."""
    ty = getattr(out, "ty", None)
    if not isinstance(ty, relax.TensorType) or (ty.shape is not None and not any(
            isinstance(d, (tirx.Min, tirx.Max)) for d in ty.shape.values)):
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


def symbolic(size, symbols: dict):
    """A torch size (int or SymInt of symbols, +, *) -> PrimExpr over the importer's tirx.Vars, or None."""
    import sympy
    if not isinstance(size, torch.SymInt):
        return tirx.IntImm("int64", int(size))

    def convert(e):
        if isinstance(e, sympy.Integer):
            return tirx.IntImm("int64", int(e))
        if isinstance(e, sympy.Symbol):
            return symbols.get(str(e))
        parts = [convert(a) for a in e.args]
        if None in parts or not isinstance(e, (sympy.Add, sympy.Mul)):
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
    return original(node)


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


FIXES = {"_reshape": reshape, "_cumsum": cumsum, "_slice": slice_, "_empty": empty}
