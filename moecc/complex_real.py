"""Complex arithmetic as real pairs, for exporters that have no complex tensors (torch.onnx, TVM).

    a complex tensor c [..., n]  ⇒  its real pairs r [..., n, 2] (torch.view_as_real's layout)

    polar(abs, angle)        ⇒  stack(abs·cos angle, abs·sin angle)
    view_as_complex(x)       ⇒  x                     view_as_real(c)  ⇒  r
    c1 · c2                  ⇒  stack(a·c − b·d, a·d + b·c)
    c · t (real), c · s      ⇒  r · t[..., None], r · s
    c1 ± c2                  ⇒  r1 ± r2
    unsqueeze, view, reshape, expand, permute, slice, select, cat, clone, alias, _to_copy
                             ⇒  the same on r, dims shifted past the pair axis

Rotary embeddings written with complex numbers (DeepSeek-V2's `torch.polar` … `view_as_real`) are the
case in transformers. Any other op on a complex value is refused with its name and node. The program
is copied, never changed in place; one without complex values is returned as is.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, fx

from .errors import MoeccError
from .quiet import torch_internal_deprecations

log = logging.getLogger("moecc.complex_real")
aten = torch.ops.aten
REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
SAME = {aten.clone.default, aten.alias.default, aten.detach.default}
TO = {aten._to_copy.default, aten.to.dtype_layout, aten.to.dtype, aten.to.device, aten.to.other}


def is_complex(a) -> bool:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(v, Tensor) and v.is_complex()


def complex_to_real(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    if not any(is_complex(n) for n in program.graph.nodes):
        return program
    with torch_internal_deprecations():
        program = copy.deepcopy(program)
    graph = program.graph
    fake = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    real: dict[fx.Node, fx.Node] = {}                       # complex node -> its [..., 2] real node

    def emit(target, *args, **kwargs) -> fx.Node:
        node = graph.call_function(target, args, kwargs)
        with fake:
            node.meta["val"] = target(*fx.map_arg(args, lambda a: a.meta["val"]),
                                      **fx.map_arg(kwargs, lambda a: a.meta["val"]))
        return node

    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        complex_in = [a for a in n.all_input_nodes if a in real]
        if not complex_in and not is_complex(n):
            continue
        if n.target is aten._assert_tensor_metadata.default:
            graph.erase_node(n)
            continue
        with graph.inserting_before(n):
            out = _rule(n, real, emit)
        if n.target is aten.view_as_real.default:
            n.replace_all_uses_with(out)
        else:
            real[n] = out
    for n in reversed(list(graph.nodes)):                   # the complex nodes, now unused
        if (n in real or n.target is aten.view_as_real.default) and not n.users:
            graph.erase_node(n)
    graph.lint()
    program.graph_module.recompile()
    log.info("complex values as real pairs: %d nodes rewritten", len(real))
    return program


def _dim(d: int) -> int:
    """A dim of a complex tensor on its real pairs (a negative dim moves past the pair axis)."""
    return d - 1 if d < 0 else d


def _rule(n: fx.Node, real: dict, emit) -> fx.Node:
    t, args, kw = n.target, n.args, n.kwargs
    r = lambda a: real[a]                                                   # noqa: E731
    if t is aten.polar.default:
        size, angle = args
        return emit(aten.stack.default, [emit(aten.mul.Tensor, size, emit(aten.cos.default, angle)),
                                          emit(aten.mul.Tensor, size, emit(aten.sin.default, angle))], -1)
    if t is aten.view_as_complex.default:
        return args[0]
    if t is aten.view_as_real.default:
        return r(args[0])
    if t is aten.mul.Tensor:
        a, b = args
        if is_complex(a) and is_complex(b):
            (ar, ai), (br, bi) = ([emit(aten.select.int, r(v), -1, i) for i in (0, 1)] for v in (a, b))
            re = emit(aten.sub.Tensor, emit(aten.mul.Tensor, ar, br), emit(aten.mul.Tensor, ai, bi))
            im = emit(aten.add.Tensor, emit(aten.mul.Tensor, ar, bi), emit(aten.mul.Tensor, ai, br))
            return emit(aten.stack.default, [re, im], -1)
        c, other = (a, b) if is_complex(a) else (b, a)
        if isinstance(other, fx.Node):
            other = emit(aten.unsqueeze.default, other, -1)
        return emit(aten.mul.Tensor, r(c), other)
    if t in (aten.add.Tensor, aten.sub.Tensor) and all(is_complex(a) for a in args[:2]):
        return emit(t, r(args[0]), r(args[1]), **kw)
    if t is aten.unsqueeze.default:
        return emit(t, r(args[0]), _dim(args[1]))
    if t in SHAPE_OPS:
        return emit(t, r(args[0]), [*args[1], 2])
    if t is aten.permute.default:
        rank = len(args[1])
        return emit(t, r(args[0]), [d % rank for d in args[1]] + [rank])
    if t in (aten.slice.Tensor, aten.select.int):
        return emit(t, r(args[0]), _dim(args[1] if len(args) > 1 else 0), *args[2:])
    if t is aten.cat.default and all(is_complex(a) for a in args[0]):
        return emit(t, [r(a) for a in args[0]], _dim(args[1] if len(args) > 1 else 0))
    if t in SAME:
        return emit(t, r(args[0]))
    if t in TO and is_complex(args[0]) and is_complex(n):             # a complex dtype cast (or a no-op)
        return emit(aten._to_copy.default, r(args[0]), dtype=REAL[n.meta["val"].dtype])
    raise MoeccError(f"node {n.name!r} ({t}) works on complex values, which moecc writes as real pairs only "
                     f"for rotary-style arithmetic (polar, view_as_complex/real, mul, add, shape ops); "
                     f"compile with --to torch (source: {_source(n)})")


def _source(n: fx.Node) -> str:
    trace = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown"
