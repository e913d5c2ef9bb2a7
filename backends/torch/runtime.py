"""Run a torch artifact: torch.export.load(model.pt2) (after registering moecc's ops)."""
from __future__ import annotations

import importlib
import logging
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("moecc.backends.torch.runtime")
_TYPE = re.compile(r'\\"type\\": \\"([A-Za-z_][\w.]*)\.\w+\\"')   # a pytree node type in in/out_spec


def _import_pytree_types(pt2: Path) -> None:
    """The program's input/output pytree types (e.g. a transformers ModelOutput) must be registered
    before torch.export.load can rebuild its specs: import the modules that define them (registration
    happens on import), so an artifact loads in a fresh process (moecc run, the EP launcher)."""
    try:
        with zipfile.ZipFile(pt2) as z:
            text = "".join(z.read(n).decode("utf-8", "replace") for n in z.namelist()
                           if n.endswith("models/model.json"))
    except (OSError, zipfile.BadZipFile):
        return                                               # torch.export.load says what is wrong
    for module in sorted(set(_TYPE.findall(text))):
        if module in sys.modules or module.split(".")[0] in ("builtins", "collections", "torch"):
            continue
        try:
            importlib.import_module(module)
            log.info("imported %s for the program's input/output types", module)
        except ImportError as e:
            log.warning("the program's outputs use %s, which cannot be imported here: %s", module, e)


def load_program(artifact_dir):
    """The artifact's ExportedProgram, with its autotuned kernel tables installed (if it has them)."""
    import torch

    import moecc.ops  # noqa: F401  (registers torch.ops.moecc.* before load)
    from . import select, skinny
    tables = Path(artifact_dir) / "kernels.json"
    if tables.exists():
        select.install(select.load(tables))
    _import_pytree_types(Path(artifact_dir) / "model.pt2")
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
