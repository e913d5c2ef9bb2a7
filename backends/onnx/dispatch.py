"""Run-time kernel dispatch on the token count: ONNX If nodes, each branch a whole kernel's graph.

    by_tokens(x [..., H], H, [(k0, T1, emit0), (k1, T2, emit1), (k2, None, emit2)])
        ⇒  If(T < T1, then: emit0(), else: If(T < T2, then: emit1(), else: emit2()))

Each branch is traced into its own subgraph (a fresh torch.onnx OpRecorder with its own constant farm,
so no constant made in a branch leaks into the enclosing graph); branches read the layer's inputs and
weights from the outer scope (ONNX lets a subgraph use outer values), so the weights are stored once.
Only the taken branch runs: e.g. decode takes the fused op, prefill the portable gather (kernels.py).
"""
from __future__ import annotations

import itertools

import onnx_ir as ir
from onnxscript import evaluator
from onnxscript import opset18 as op

from .portable import flat_tokens
from .consts import ints


_count = itertools.count()


def _branch(name: str, build):
    from torch.onnx._internal.exporter._building import OpRecorder
    recorder = OpRecorder(evaluator.default().opset, {})
    with evaluator.default_as(recorder):
        y = build()
    # ONNX wants every value name unique across a graph and its subgraphs (SSA): name the branch's own
    tag = f"br{next(_count)}"
    values = itertools.count()
    for j, node in enumerate(recorder.nodes):
        node.name = f"{tag}_{node.op_type}_{j}"
        for v in node.outputs:
            v.name = f"{tag}_{v.name or 'v'}_{next(values)}"
    return ir.Graph(inputs=[], outputs=[y], nodes=recorder.nodes, name=name)


def by_tokens(x, hidden: int, plan: list):
    """plan: [(kernel, below T or None for the last, emit() -> y)]."""
    (kernel, below, build), rest = plan[0], plan[1:]
    if not rest:
        return build()
    _, T, _ = flat_tokens(x, hidden)                                       # [1] int64
    cond = op.Squeeze(op.Less(T, ints(below)), ints(0))                    # [] bool
    return op.If(cond, then_branch=_branch(f"{kernel}_below_{below}_tokens".replace(".", "_"), build),
                 else_branch=_branch(f"from_{below}_tokens", lambda: by_tokens(x, hidden, rest)))
