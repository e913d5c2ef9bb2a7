"""Run a torch artifact: torch.export.load(model.pt2) (after registering moecc's ops)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_program(artifact_dir):
    """The artifact's ExportedProgram, with its autotuned kernel tables installed (if it has them)."""
    import torch

    import moecc.ops  # noqa: F401  (registers torch.ops.moecc.* before load)
    from . import select, skinny
    tables = Path(artifact_dir) / "kernels.json"
    if tables.exists():
        select.install(select.load(tables))
    program = torch.export.load(Path(artifact_dir) / "model.pt2")
    skinny.available()                   # build/load the C kernel now, not inside the first forward
    for node in program.graph.nodes:     # ... and resolve torch.auto's choices (no measuring in a forward)
        if node.op == "call_function" and node.target is torch.ops.moecc.moe.default:
            kernel = node.args[-1]
            if isinstance(kernel, str) and kernel.startswith(select.AUTO):
                select.warm(moecc.ops.parse_spec(node.args[moecc.ops.OP_ARGS.index("spec")]), kernel)
    return program


def load(artifact_dir, manifest: dict | None = None):
    """`run(inputs)`; inputs outside the manifest's bounds are refused before torch runs."""
    import torch
    from torch.utils._pytree import tree_leaves

    from ..input_check import check
    module = load_program(artifact_dir).module()
    specs = (manifest or {}).get("inputs")

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        check(inputs, specs)
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        return [t.detach().numpy() for t in tree_leaves(out)]
    return run
