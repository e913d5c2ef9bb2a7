"""Torch backend: the decomposed program with a kernel chosen per experts node, saved with torch.export.save.

    ExportedProgram (moe nodes)  ⇒  moecc.decompose: routing as ATen ops + one experts node per layer
                                 ⇒  experts nodes' `kernel` argument set  ⇒  model.pt2 (+ kernels.json)

The token count varies at run time, so a layer's kernel is "torch.auto@<table>": it dispatches per call
by token-count bucket (decode … prefill) from its own table in the artifact's kernels.json: the cost
model's choices, or with `--autotune` measurements made here (nothing is measured at run time, and two
artifacts never share a table). `--kernel NAME` forces one kernel everywhere.
Loading needs `import moecc.ops` before `torch.export.load`: `moecc.load(dir)` does it.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch

from moecc.decompose import decompose, experts_nodes, set_experts_kernel
from moecc.errors import MoeccError

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
        if not options.get("kernel") and key not in tables:          # carried: no measuring at run time
            tables[key] = select.autotune(spec) if options.get("autotune") else select.cost_table(spec)
        choice = choose_kernel(spec, options, tables.get(key))
        if key in tables and choice.kernel == select.AUTO:           # this artifact's own table
            choice = dataclasses.replace(choice, kernel=select.install_layer(tables[key]))
        set_experts_kernel(node, choice.kernel)
        choices.append(choice)
    program.graph_module.recompile()
    files = ["model.pt2"]
    buffer = io.BytesIO()                  # torch's C++ writer aborts the process on a full disk:
    try:                                   # write the bytes from Python (a catchable OSError)
        torch.export.save(program, buffer)
    except Exception as e:                 # noqa: BLE001  (torch's serializer: an op it cannot write)
        text = str(e).strip().splitlines()
        raise MoeccError(f"torch backend: torch.export cannot serialize the program "
                         f"({type(e).__name__}: {text[0][:300] if text else ''}); compile with "
                         "--to onnx or --to tvm, or report the op") from None
    (Path(out_dir) / "model.pt2").write_bytes(buffer.getbuffer())
    if tables:
        select.save({select.table_id(t): t for t in tables.values()}, Path(out_dir) / TABLES)
        files.append(TABLES)
    return Lowered(files=files, kernels=choices, notes={"format": "torch.export (.pt2), decomposed: "
                                                        "routing as ATen ops, one moecc::experts node per layer",
                                                        "autotuned": bool(options.get("autotune") and tables)})
