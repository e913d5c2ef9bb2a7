"""Torch backend: the decomposed program with a kernel chosen per experts node, saved with torch.export.save.

    ExportedProgram (moe nodes)  ⇒  moecc.decompose: routing as ATen ops + one experts node per layer
                                 ⇒  experts nodes' `kernel` argument set  ⇒  model.pt2 (+ kernels.json)

The token count varies at run time, so a layer's kernel is "torch.auto": it dispatches per call by
token-count bucket (decode … prefill), from the cost model or, with `--autotune`, from measurements
made here and carried in the artifact's kernels.json. `--kernel NAME` forces one kernel everywhere.
Loading needs `import moecc.ops` before `torch.export.load`: `moecc.load(dir)` does it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moecc.decompose import decompose, experts_nodes, set_experts_kernel

from ..base import KernelChoice, Lowered
from . import select

TABLES = "kernels.json"


def choose_kernel(spec, options: dict, table: dict | None) -> KernelChoice:
    forced = options.get("kernel")
    if forced:
        return KernelChoice(spec.name, forced, "forced by --kernel")
    return select.choose(spec, 0, table=table)


def lower(program: torch.export.ExportedProgram, out_dir: Path, options: dict) -> Lowered:
    program = decompose(program)
    choices, tables = [], {}
    for node, spec in experts_nodes(program.graph_module):
        key = select.spec_key(spec)
        if options.get("autotune") and not options.get("kernel") and key not in tables:
            tables[key] = select.autotune(spec)
        choice = choose_kernel(spec, options, tables.get(key))
        set_experts_kernel(node, choice.kernel)
        choices.append(choice)
    program.graph_module.recompile()
    files = ["model.pt2"]
    torch.export.save(program, Path(out_dir) / "model.pt2")
    if tables:
        select.save(tables, Path(out_dir) / TABLES)
        select.install(tables)             # verification in this process uses them too
        files.append(TABLES)
    return Lowered(files=files, kernels=choices, notes={"format": "torch.export (.pt2), decomposed: "
                                                        "routing as ATen ops, one moecc::experts node per layer",
                                                        "autotuned": bool(tables)})
