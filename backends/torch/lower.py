"""Torch backend: the exported program with a kernel chosen per MoE layer, saved with torch.export.save.

    ExportedProgram  ⇒  moe nodes' `kernel` argument set (cost model / autotune)  ⇒  model.pt2

Loading needs `import moecc.ops` (the custom op) before `torch.export.load`: `moecc.load(dir)` does it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moecc.ops import OP_ARGS, parse_spec
from moecc.pipeline import MOE_OP

from ..base import KernelChoice, Lowered

KERNEL_ARG = OP_ARGS.index("kernel")
SPEC_ARG = OP_ARGS.index("spec")


def choose_kernel(spec, tokens: int, options: dict) -> KernelChoice:
    """The kernel for one layer; `options["kernel"]` forces one."""
    forced = options.get("kernel")
    if forced:
        return KernelChoice(spec.name, forced, "forced by --kernel")
    from . import select
    return select.choose(spec, tokens)


def set_kernels(program: torch.export.ExportedProgram, tokens: int, options: dict) -> list[KernelChoice]:
    choices = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is MOE_OP:
            choice = choose_kernel(parse_spec(node.args[SPEC_ARG]), tokens, options)
            args = list(node.args)
            args[KERNEL_ARG] = choice.kernel
            node.args = tuple(args)
            choices.append(choice)
    program.graph_module.recompile()
    return choices


def lower(program: torch.export.ExportedProgram, out_dir: Path, options: dict) -> Lowered:
    choices = set_kernels(program, int(options.get("tokens", 0)), options)
    torch.export.save(program, Path(out_dir) / "model.pt2")
    return Lowered(files=["model.pt2"], kernels=choices, notes={"format": "torch.export (.pt2)"})
