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
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise MoeccError(f"cannot read {path} as .npz: {type(e).__name__}: {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MoeccError(f"{path} is a single .npy array; save the inputs as .npz, e.g. "
                         f"np.savez('tokens.npz', {manifest['inputs'][0]['name']}=array) "
                         "(or: moecc run ARTIFACT --example-input tokens.npz)")
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


def check_manifest(artifact: Path, manifest: dict) -> dict:
    """The keys `moecc run` needs, of the types it needs: else one line, not a KeyError."""
    backend = manifest.get("backend") if isinstance(manifest, dict) else None
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    if not (isinstance(backend, dict) and isinstance(backend.get("name"), str) and isinstance(inputs, list)
            and inputs and all(isinstance(i, dict) and {"name", "dtype", "shape"} <= set(i) for i in inputs)):
        raise MoeccError(f"{artifact}: manifest.json is not a moecc artifact manifest (no backend name or "
                         "input list); recompile the artifact with moecc compile")
    return manifest


EXAMPLE_SIZES = {"batch": 2, "seq": 16}


def example_inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs the artifact accepts: dims batch=2, seq=16 (others 8), within the recorded
    bounds; token ids uniform in their recorded range; floats standard normal."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in manifest["inputs"]:
        shape = []
        for d in spec["shape"]:
            if isinstance(d, int):
                shape.append(d)
                continue
            bound = (spec.get("dims") or {}).get(d, {})
            size = max(EXAMPLE_SIZES.get(d, 8), bound.get("min", 1))
            shape.append(min(size, bound.get("max", size)))
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = np.ones(shape, dtype)
        else:
            v = spec.get("values") or {"min": 0, "max": 1}
            out[spec["name"]] = rng.integers(v.get("min", 0), v.get("max", 1) + 1, shape).astype(dtype)
    return out


def write_example_input(artifact: Path, path: Path, force: bool = False) -> dict[str, np.ndarray]:
    """`moecc run ARTIFACT --example-input tokens.npz`: a valid input file to start from."""
    from .cli_checks import check_out_file
    manifest = check_manifest(artifact, read_manifest(artifact))
    check_out_file(path, force, "--example-input")
    arrays = example_inputs(manifest)
    np.savez(path, **arrays)
    return arrays


def run_artifact(artifact: Path, inputs: Path, output: Path | None = None) -> list[np.ndarray]:
    from . import backends
    manifest = check_manifest(artifact, read_manifest(artifact))
    arrays = read_inputs(inputs, manifest)
    if output is not None:
        from .cli_checks import check_writable
        check_writable(output, "--output")
    run = backends.runtime(manifest["backend"]["name"]).load(artifact, manifest)
    outputs = run(arrays)
    if output is not None:
        np.savez(output, *outputs)
    return outputs
