"""Run an expert-parallel torch artifact on N ranks:

    torchrun --nproc-per-node N -m moecc.distributed.launch ARTIFACT --input in.npz [--output y.npz]
             [--timeout 60] [--backend gloo|nccl] [--overlap-degree 1..8|auto] [--schedule s.json]

Each rank loads the artifact (compiled with `moecc compile ... --to torch --ep N`), checks with the
others that all run the same model and plan (one all_gather, up front), rewrites its experts layers
with passes/expert_parallel.apply (keeping only the experts it holds), takes its share of the
input batch (dim 0 split as numpy.array_split: rank r gets the r-th block), and runs it; rank 0
gathers the outputs (dim 0, rank order) and writes --output. Every collective is bounded by
--timeout seconds: a dead or stalled rank makes every other rank exit non-zero with one line naming
the rank and the layer (no traceback, no hang). --overlap-degree: each experts layer in token chunks
whose all-to-alls overlap compute (moecc.distributed.schedule: a warm-up forward, constants measured
on the ranks, the degree per layer; --schedule writes the chosen schedule with predicted times).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def _fingerprint(*docs) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).digest()[:8],
                          "little") >> 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecc.distributed.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--input", required=True, type=Path, help=".npz with the model inputs (whole batch)")
    p.add_argument("--output", type=Path, help="rank 0 writes the outputs (whole batch) here")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any collective may wait")
    p.add_argument("--backend", help="gloo (CPU, default without a GPU) or nccl")
    p.add_argument("--overlap-degree", choices=["auto", *map(str, range(1, 9))],
                   help="token chunks per experts layer, their all-to-alls in flight while others "
                        "compute: 1 (none), 2..8, or auto (per layer, the cost model's choice from "
                        "constants measured at start-up); default: the artifact's schedule.json "
                        "(compile --overlap-degree), else 1")
    p.add_argument("--schedule", type=Path, help="rank 0 writes the overlap schedule (schedule.json) here")
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        _run(a)
    except Exception as e:   # one line per rank, never a hang in teardown
        from moecc.errors import MoeccError
        text = str(e) if isinstance(e, MoeccError) else f"{type(e).__name__}: {e}"
        if not text.startswith("rank "):
            text = f"rank {rank}: {text}"
        print(f"moecc launch: error: {text.splitlines()[0] if text else ''}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _run(a) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_leaves

    from moecc.artifact import read_manifest
    from moecc.backends.torch.runtime import load_program
    from moecc.errors import MoeccError
    from moecc.frontend import _drop_guards
    from moecc.passes.expert_parallel import EPPlan, apply
    from moecc.run_artifact import read_inputs

    from .comm import agree, fail, init

    manifest = read_manifest(a.artifact)
    if manifest["backend"]["name"] != "torch" or not (a.artifact / "ep.json").exists():
        raise MoeccError(f"{a.artifact} is not an expert-parallel torch artifact (compile it with "
                         "`moecc compile ... --to torch --ep N`)")
    doc = json.loads((a.artifact / "ep.json").read_text())
    plan = EPPlan.from_json(doc)
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":                                    # one GPU per rank (torchrun LOCAL_RANK)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    group = init(backend, a.timeout, init_timeout_s=max(a.timeout, 60.0))   # start-up: slower
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.world:
        raise fail("launch", f"the artifact is planned for {plan.world} ranks, torchrun started {world}")
    mine = torch.tensor([_fingerprint(doc, manifest["layers"], manifest["inputs"])], dtype=torch.int64)
    every = agree(mine, group, "launch: model and plan check")[:, 0]
    if (every != mine).any():
        other = int(torch.nonzero(every != mine)[0, 0])
        raise fail("launch", f"rank {other} loaded a different model or expert-parallel plan")
    inputs = read_inputs(a.input, manifest)
    batch = inputs[0].shape[0]
    if batch < world:
        raise fail("launch", f"the input batch has {batch} rows, fewer than the {world} ranks")
    gm = load_program(a.artifact).module()
    _drop_guards(gm)
    gm = apply(gm, plan, group).to(device)
    parts = [np.array_split(x, world)[rank] for x in inputs]
    degree = a.overlap_degree or _compiled_degree(a.artifact)
    if degree != "1":
        from .schedule import configure
        configure(gm, group, lambda: gm(*[torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in parts]),
                  degree, a.schedule)
    with torch.no_grad():
        out = [t.detach().cpu().numpy() for t in tree_leaves(gm(*[
            torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in parts]))]
    gathered = [None] * world
    dist.all_gather_object(gathered, out, group=group)
    if rank == 0 and a.output is not None:
        np.savez(a.output, *[np.concatenate([g[i] for g in gathered]) for i in range(len(out))])
        print(f"wrote {a.output} ({world} ranks)")


def _compiled_degree(artifact: Path) -> str:
    """The degree `moecc compile --overlap-degree` wrote into schedule.json, or "1"."""
    path = artifact / "schedule.json"
    if not path.exists():
        return "1"
    degrees = {lay["degree"] for lay in json.loads(path.read_text())["layers"]}
    return str(degrees.pop()) if len(degrees) == 1 else "auto"


if __name__ == "__main__":
    sys.exit(main())
