"""Pass infrastructure: PassResult, PassManager, and the graph invariants checked after every pass.

    pass(gm: fx.GraphModule) -> PassResult(graph_module, modified, stats)

The PassManager runs passes in order, re-checks the graph after each (fx lint, every moecc::moe node's
`node.meta["moecc.spec"]` equal to its `spec` argument and valid), times them, and turns a failure into
one `MoeccError` naming the pass and, where known, the node.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import fx

from . import ops
from .errors import MoeccError
from .spec import MoESpec

log = logging.getLogger("moecc.passes")

MOE_OP = torch.ops.moecc.moe.default
EXPERTS_OP = torch.ops.moecc.experts.default
SPEC_KEY = "moecc.spec"
SPEC_ARG = ops.OP_ARGS.index("spec")
KERNEL_ARG = ops.OP_ARGS.index("kernel")


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


class PassError(MoeccError):
    """A pass failed at a specific node."""

    def __init__(self, node: fx.Node | None, message: str):
        self.node = node
        super().__init__(f"node {node.name}: {message}" if node is not None else message)


Pass = Callable[[fx.GraphModule], PassResult]


def moe_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, MoESpec]]:
    """Every canonical MoE node with its spec (parsed from the op's argument, the source of truth)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is MOE_OP:
            yield node, ops.parse_spec(node.args[SPEC_ARG])


def layer_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, MoESpec]]:
    """Every MoE layer's node with its spec: moe nodes, and experts nodes a capture made directly
    (transformers' experts interface) or a decomposition left (for the manifest)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (MOE_OP, EXPERTS_OP):
            args = ops.OP_ARGS if node.target is MOE_OP else ops.EXPERTS_ARGS
            yield node, ops.parse_spec(node.args[args.index("spec")])


def set_spec(node: fx.Node, spec: MoESpec) -> None:
    """Write a spec to both places it lives: the op argument and node.meta."""
    args = list(node.args)
    args[SPEC_ARG] = spec.to_json()
    node.args = tuple(args)
    node.meta[SPEC_KEY] = spec


def attr(gm: fx.GraphModule, target: str):
    """The object behind a get_attr target ("layers.0.w_in"): the dotted path walked from gm."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def delete_attr(gm: fx.GraphModule, target: str) -> None:
    """Remove a get_attr target's tensor from its owner module (if it is still there)."""
    *path, leaf = target.split(".")
    owner = attr(gm, ".".join(path)) if path else gm
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def annotate(gm: fx.GraphModule) -> fx.GraphModule:
    """Fill node.meta["moecc.spec"] on captured MoE nodes (from their argument)."""
    for node, spec in moe_nodes(gm):
        node.meta[SPEC_KEY] = spec
    return gm


def check_graph(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    for node, spec in moe_nodes(gm):
        if node.meta.get(SPEC_KEY) != spec:
            raise PassError(node, "node.meta['moecc.spec'] disagrees with the op's spec argument")
        try:
            spec.validate()
        except MoeccError as e:
            raise PassError(node, str(e)) from None


@dataclass
class PassRecord:
    name: str
    modified: bool
    stats: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "modified": self.modified, "stats": self.stats,
                "seconds": round(self.seconds, 4)}


@dataclass
class PassManager:
    passes: list[tuple[str, Pass]]
    records: list[PassRecord] = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        annotate(gm)
        check_graph(gm)
        for name, p in self.passes:
            t0 = time.perf_counter()
            try:
                result = p(gm)
                gm = result.graph_module
                check_graph(gm)
                gm.recompile()
            except MoeccError as e:
                raise MoeccError(f"pass '{name}' failed: {e}") from None
            except Exception as e:  # a bug in a pass: still say which pass
                raise MoeccError(f"pass '{name}' failed with {type(e).__name__}: {e}") from e
            self.records.append(PassRecord(name, result.modified, dict(result.stats),
                                           time.perf_counter() - t0))
            log.info("pass %s: %s (%.2f s)", name, dict(result.stats), self.records[-1].seconds)
        return gm
