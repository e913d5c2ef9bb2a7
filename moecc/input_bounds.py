"""The bounds a captured model's inputs must stay within, read off its graph at compile time.

    tokens ─► embedding(W [V, D])                       ⇒  tokens values in [0, V-1]
    sym_size(tokens, d) ─► arange ─► embedding(W [P, D]) ⇒  dim d of tokens in [1, P]
    every dynamic dim                                   ⇒  at least 1 (an empty sequence is refused)

`find(gm, specs)` returns the manifest's input entries with these bounds added; the runtimes check
them before running (backends/input_check.py), so no artifact reads a table out of bounds.
"""
from __future__ import annotations

import torch
from torch import fx

from .inputs import InputSpec

_EMBEDDING = {torch.ops.aten.embedding.default}
_PASS_THROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default,
                 torch.ops.aten.squeeze.dim, torch.ops.aten.flatten.using_ints, torch.ops.aten.clone.default,
                 torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.contiguous.default,
                 torch.ops.aten.alias.default}
_ARANGE = {torch.ops.aten.arange.default, torch.ops.aten.arange.start}
_SYM_SIZE = {torch.ops.aten.sym_size.int}


def _source(node) -> fx.Node | None:
    """The placeholder `node` is (after view-like ops), else None."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node
        if node.op != "call_function" or node.target not in _PASS_THROUGH:
            return None
        node = node.args[0]
    return None


def _rows(node, gm: fx.GraphModule) -> tuple[int, str] | None:
    """(rows, name) of an embedding table given as a get_attr (or a placeholder with a value)."""
    if node.op == "get_attr":
        t = gm
        for part in str(node.target).split("."):
            t = getattr(t, part, None)
        shape = getattr(t, "shape", None)
    else:
        shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None or not len(shape) or not isinstance(shape[0], int):
        return None
    return int(shape[0]), str(node.target)


def _arange_dim(node) -> tuple[str, int] | None:
    """(placeholder name, dim) when `node` is arange(sym_size(x, d)) or arange(0, sym_size(x, d))."""
    if node.op != "call_function" or node.target not in _ARANGE:
        return None
    if node.target is torch.ops.aten.arange.start and node.args[0] != 0:
        return None
    end = node.args[-1] if node.target is torch.ops.aten.arange.default else node.args[1]
    if not (isinstance(end, fx.Node) and end.op == "call_function" and end.target in _SYM_SIZE):
        return None
    src = _source(end.args[0])
    return (src.name, int(end.args[1])) if src is not None else None


def find(gm: fx.GraphModule, specs: list[InputSpec]) -> list[dict]:
    """Manifest input entries: name, dtype, shape (dynamic dims named), `dims` {name: {min, max?, why?}}
    and, for token-id inputs, `values` {min, max, why}."""
    entries = {s.name: dict(s.to_dict(), dims={d: {"min": 1} for d in s.shape if isinstance(d, str)})
               for s in specs}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _EMBEDDING:
            continue
        table, index = node.args[0], node.args[1]
        rows = _rows(table, gm)
        if rows is None:
            continue
        n, name = rows
        src = _source(index)
        if src is not None and src.name in entries:
            _tighten(entries[src.name].setdefault("values", {"min": 0}), n - 1, f"{name} has {n} rows")
        at = _arange_dim(index) if isinstance(index, fx.Node) else None
        if at is not None and at[0] in entries:
            dim = entries[at[0]]["shape"][at[1]]
            if isinstance(dim, str):
                for e in entries.values():
                    if dim in e["dims"]:
                        _tighten(e["dims"][dim], n, f"{name} has {n} positions")
    return [entries[s.name] for s in specs]


def _tighten(bound: dict, hi: int, why: str) -> None:
    if "max" not in bound or hi < bound["max"]:
        bound["max"], bound["why"] = hi, why


__all__ = ["find"]
