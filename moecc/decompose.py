"""Lower each `moecc::moe` node to routing as ATen ops + ONE `moecc::experts` node (+ the shared expert).

    moe(x [..., H], logits [..., L], w_in, w_out, b_in?, b_out?, router_bias?, shared_w_in?,
        shared_w_out?, shared_gate?, token_ids?, spec, kernel)
      ⇒  xt = x.reshape(T, H)                                            # [T, H]
         weights, ids = moecc.routing.route(logits.reshape(T, L), spec, router_bias, token_ids, rows)
                                                                         # ATen ops, [T, S] each
         y = torch.ops.moecc.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec, kernel)
         y = y + moecc.ops.shared_expert(xt, shared_w_in, shared_w_out, shared_gate, spec)   # ATen
         y.reshape(x.shape)

The output form every backend lowers (`decompose(program) -> ExportedProgram`):
- routing is ordinary ATen ops traced from `moecc.routing.route` (the ONE router definition; no
  backend defines a router), with the token count T symbolic wherever the input's dims are
  (`torch.export.Dim`): capacities that depend on T (capacity factor, expert choice) stay symbolic;
- each MoE layer is one `torch.ops.moecc.experts.default` node whose `spec` argument (MoESpec JSON,
  the layer's name included) is also on `node.meta["moecc.spec"]`, and whose `kernel` argument is the
  moe node's (a backend then sets its own);
- the shared expert (if any) is ATen ops after it, added last, as in `moe_reference`: the
  decomposed program computes exactly what `moe_reference` does, op for op.

`keep(spec) -> int` (optional) keeps a layer's `moe` node whole for some token counts (e.g. the ONNX
backend's fused `com.microsoft::MoE`, which routes inside): 0 = decompose (default), `ALWAYS` = keep
the moe node as is, B > 0 = `torch.cond(T < B, moe node, decomposed)` (torch.onnx exports it as an If
on the token count). A kept node keeps its spec and kernel arguments.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ops
from .pipeline import EXPERTS_OP, MOE_OP, SPEC_KEY
from .quiet import torch_internal_deprecations
from .spec import MoESpec

ALWAYS = sys.maxsize            # keep(spec) -> ALWAYS: the layer stays one moe node
EXPERTS_SPEC_ARG = ops.EXPERTS_ARGS.index("spec")
EXPERTS_KERNEL_ARG = ops.EXPERTS_ARGS.index("kernel")


def decomposed_moe(x: Tensor, logits: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor],
                   b_out: Optional[Tensor], router_bias: Optional[Tensor], shared_w_in: Optional[Tensor],
                   shared_w_out: Optional[Tensor], shared_gate: Optional[Tensor], token_ids: Optional[Tensor],
                   spec: str, kernel: str) -> Tensor:
    """`moe_reference` with the experts as the `moecc::experts` op: what a moe node decomposes to."""
    return _decomposed(ops.parse_spec(spec), x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in,
                       shared_w_out, shared_gate, token_ids, spec, kernel)


def _decomposed(s: MoESpec, x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out,
                shared_gate, token_ids, spec: str, kernel: str) -> Tensor:
    xt, weights, ids = ops.routed(x, logits, router_bias, token_ids, s)   # [T, H], [T, S], [T, S]
    y = torch.ops.moecc.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec, kernel)    # [T, H]
    if shared_w_in is not None:
        y = y + ops.shared_expert(xt, shared_w_in, shared_w_out, shared_gate, s)
    return y.reshape(x.shape)


def _decomposition(keep: Callable[[MoESpec], int] | None):
    """The run_decompositions entry for moe nodes. Returning NotImplemented keeps the node as is:
    the kept layers, and the moe node a cond's first branch re-emits (kernel marked `_KEPT`)."""
    def fn(*args, **kwargs):
        a = dict(zip(ops.OP_ARGS, args), **kwargs)
        if a["kernel"].startswith(_KEPT):
            return NotImplemented
        spec = ops.parse_spec(a["spec"])                 # outside any branch: dynamo traces branches
        below = 0 if keep is None else keep(spec)
        if below >= ALWAYS:
            return NotImplemented
        if below <= 0:
            return _decomposed(spec, *[a[n] for n in ops.OP_ARGS])
        names = [n for n in ops.OP_ARGS[:-2] if a[n] is not None]

        def args_of(ts) -> list:
            b = dict(a, **dict(zip(names, ts)))
            return [b[n] for n in ops.OP_ARGS]

        def whole(*ts):                                  # [..., H]: the moe node, kept
            return torch.ops.moecc.moe(*args_of(ts)[:-1], _KEPT + a["kernel"])

        def split(*ts):                                  # [..., H]: route + experts
            return _decomposed(spec, *args_of(ts))
        x = a["x"]
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return torch.cond(tokens < below, whole, split, tuple(a[n] for n in names))
    return fn


_KEPT = "kept:"   # marks a moe node a cond branch re-emits while tracing (stripped afterwards)


def decompose(program: torch.export.ExportedProgram,
              keep: Callable[[MoESpec], int] | None = None) -> torch.export.ExportedProgram:
    """Every moe node ⇒ route (ATen) + experts node (+ shared expert); see the module docstring.
    A program without moe nodes is returned as is."""
    if not any(n.op == "call_function" and n.target is MOE_OP for n in program.graph.nodes):
        return program
    # torch.cond traces its branches with dynamo: a layer's spec ints (top_k, ...) that differ from
    # the previous layer's must stay constants, not become dynamic graph inputs on recompile
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False), torch_internal_deprecations():
        out = program.run_decompositions({MOE_OP: _decomposition(keep)})
    kernel_arg = ops.OP_ARGS.index("kernel")
    for gm in _modules(out.graph_module):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is EXPERTS_OP:
                node.meta[SPEC_KEY] = ops.parse_spec(node.args[EXPERTS_SPEC_ARG])
            elif node.op == "call_function" and node.target is MOE_OP:
                kernel = node.args[kernel_arg]
                if kernel.startswith(_KEPT):
                    node.args = (*node.args[:kernel_arg], kernel[len(_KEPT):])
                node.meta[SPEC_KEY] = ops.parse_spec(node.args[ops.OP_ARGS.index("spec")])
        gm.recompile()
    return out


def _modules(gm: torch.fx.GraphModule):
    """The graph module and its submodules (torch.cond branches)."""
    yield gm
    for _, sub in gm.named_modules():
        if sub is not gm and isinstance(sub, torch.fx.GraphModule):
            yield sub


def experts_nodes(gm: torch.fx.GraphModule):
    """(node, MoESpec) for every experts node of a decomposed program's graph module (branches included)."""
    for m in _modules(gm):
        for node in m.graph.nodes:
            if node.op == "call_function" and node.target is EXPERTS_OP:
                yield node, ops.parse_spec(node.args[EXPERTS_SPEC_ARG])


def set_experts_kernel(node: torch.fx.Node, kernel: str) -> None:
    node.args = tuple(kernel if i == EXPERTS_KERNEL_ARG else a for i, a in enumerate(node.args))
