"""`moecc run`: load an artifact with its backend's runtime (no torch for onnx/tvm) and run it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifact import read_manifest
from .errors import MoeccError


def read_inputs(path: Path, manifest: dict) -> list[np.ndarray]:
    if not path.exists():
        raise MoeccError(f"input file {path} does not exist")
    try:
        data = np.load(path)
    except Exception as e:
        raise MoeccError(f"cannot read {path} as .npz: {e}") from None
    names = [i["name"] for i in manifest["inputs"]]
    if all(n in data for n in names):
        arrays = [data[n] for n in names]
    elif len(data.files) == len(names):
        arrays = [data[k] for k in data.files]
    else:
        raise MoeccError(f"{path} has arrays {data.files}; the model takes {names}")
    for a, spec in zip(arrays, manifest["inputs"]):
        if str(a.dtype) != spec["dtype"] or a.ndim != len(spec["shape"]):
            raise MoeccError(f"input {spec['name']}: expected {spec['dtype']} with {len(spec['shape'])} dims "
                             f"{spec['shape']}, got {a.dtype} {list(a.shape)}")
    return arrays


def run_artifact(artifact: Path, inputs: Path, output: Path | None = None) -> list[np.ndarray]:
    from . import backends
    manifest = read_manifest(artifact)
    run = backends.runtime(manifest["backend"]["name"]).load(artifact, manifest)
    outputs = run(read_inputs(inputs, manifest))
    if output is not None:
        np.savez(output, *outputs)
    return outputs
