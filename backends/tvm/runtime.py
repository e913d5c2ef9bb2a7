"""Run a TVM artifact with tvm + numpy only (no torch; this file also works copied out of moecc).

    load(DIR, manifest) -> run(inputs: list[np.ndarray]) -> list[np.ndarray]
    DIR/tvm_meta.json (inputs, parameter order, hashes) + DIR/model.so + DIR/params.npz
    with "dispatch" (one library per token bucket, lower.py / dispatch.py): every call runs the first
    library whose bucket holds T = the product of the input dims "dispatch.tokens" names

tvm_ffi imports torch eagerly when torch is installed; `import_tvm` hides torch during that import
so a serving process stays torch-free (tvm_ffi treats a missing torch as optional).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

try:
    from moecc.backends.input_check import MoeccError, check
except ImportError:   # without moecc: input_check.py beside this file, or in the checkout's backends/
    import importlib.util

    _where = [p for p in (Path(__file__).with_name("input_check.py"), Path(__file__).parents[1] / "input_check.py")
              if p.exists()]
    if not _where:
        raise ImportError("copy backends/input_check.py beside this runtime: it refuses inputs outside the "
                          "artifact's bounds before they reach the model") from None
    _spec = importlib.util.spec_from_file_location("moecc_input_check", _where[0])
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    MoeccError, check = _module.MoeccError, _module.check

META = "tvm_meta.json"
FORMAT = "moecc.tvm/1"


def import_tvm():
    """`import tvm` without letting tvm_ffi pull in torch (if torch is not loaded already)."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm
        return tvm
    sys.modules["torch"] = None            # makes `import torch` raise ImportError inside tvm_ffi
    try:
        import tvm
        import tvm.runtime.vm  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


def read_meta(artifact: Path) -> dict:
    path = artifact / META
    if not path.exists():
        raise MoeccError(f"TVM artifact {artifact} is incomplete: no {META}; recompile it with --to tvm")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeccError(f"TVM artifact {artifact}: {META} is corrupted ({e}); recompile it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MoeccError(f"TVM artifact {artifact}: {META} is not a {FORMAT} description; recompile it")
    for name in [*libraries(meta), meta["params"]]:
        file = artifact / name
        if not file.exists():
            raise MoeccError(f"TVM artifact {artifact} is incomplete: {name} is missing; recompile it")
        if sha256(file) != meta["sha256"].get(name):
            raise MoeccError(f"TVM artifact {artifact}: {name} is corrupted (its checksum does not match "
                             f"{META}); recompile it")
    return meta


def load(artifact_dir, manifest: dict | None = None):
    """`run(inputs)`; inputs outside the bounds in the manifest (given, else DIR/manifest.json) are
    refused before TVM runs: its compiled gathers do not check indices."""
    artifact = Path(artifact_dir)
    meta = read_meta(artifact)
    specs = (manifest or _manifest(artifact)).get("inputs")
    tvm = import_tvm()
    if meta["device"] != "cpu":
        raise MoeccError(f"TVM artifact {artifact} targets {meta['device']}; this runtime runs CPU artifacts")
    dev = tvm.cpu()
    mains = [_main(tvm, artifact, name, dev) for name in libraries(meta)]
    buckets = [e["below"] for e in (meta.get("dispatch") or {}).get("libraries", [{"below": None}])]
    token_dims = (meta.get("dispatch") or {}).get("tokens") or []
    with np.load(artifact / meta["params"]) as data:
        missing = [n for n in meta["param_names"] if n not in data]
        if missing:
            raise MoeccError(f"TVM artifact {artifact}: {meta['params']} lacks {missing}; recompile it")
        dtypes = meta.get("param_dtypes") or [None] * len(meta["param_names"])
        params = [tvm.runtime.tensor(as_dtype(data[n], d), dev) for n, d in zip(meta["param_names"], dtypes)]

    def library_for(tokens: int) -> str:
        """The library a call with `tokens` tokens runs (the first bucket with tokens < below)."""
        return libraries(meta)[pick(tokens)]

    def pick(tokens: int) -> int:
        return next(j for j, below in enumerate(buckets) if below is None or tokens < below)

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        check(inputs, specs)
        arrays = check_inputs(inputs, meta["inputs"])
        T = int(np.prod([arrays[i].shape[axis] for i, axis in token_dims], dtype=np.int64))
        main = mains[pick(T)]
        out = main(*[tvm.runtime.tensor(a, dev) for a in arrays], *params)
        return [np.asarray(o.numpy()) for o in flatten(out)]
    run.library_for = library_for
    return run


def libraries(meta: dict) -> list[str]:
    """The artifact's libraries: one per token bucket (dispatch), else meta["library"]."""
    return [e["library"] for e in (meta.get("dispatch") or {}).get("libraries", [])] or [meta["library"]]


def _main(tvm, artifact: Path, name: str, dev):
    try:
        return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(artifact / name)), dev)["main"]
    except Exception as e:
        raise MoeccError(f"TVM artifact {artifact}: {name} does not load with TVM "
                         f"{tvm.__version__} ({type(e).__name__}); recompile it") from None


def _manifest(artifact: Path) -> dict:
    try:
        return json.loads((artifact / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def check_inputs(inputs: list, specs: list[dict]) -> list[np.ndarray]:
    """Same count, rank, static dims; dtypes converted within their kind (int32 -> int64 ...)."""
    if len(inputs) != len(specs):
        raise MoeccError(f"the TVM model takes {len(specs)} inputs ({', '.join(s['name'] for s in specs)}), "
                         f"got {len(inputs)}")
    arrays = []
    for a, s in zip(inputs, specs):
        a = np.asarray(a)
        want = np_dtype(s["dtype"])
        if a.ndim != len(s["shape"]) or any(isinstance(d, int) and d != n for d, n in zip(s["shape"], a.shape)):
            raise MoeccError(f"input {s['name']}: expected shape {s['shape']}, got {list(a.shape)}")
        if a.dtype != want:
            if a.dtype.kind != want.kind and not (a.dtype.kind in "iu" and want.kind in "iu"):
                raise MoeccError(f"input {s['name']}: expected {want}, got {a.dtype}")
            a = a.astype(want)
        arrays.append(np.ascontiguousarray(a))
    return arrays


def np_dtype(name: str) -> np.dtype:
    """numpy dtype by TVM name; bfloat16 is ml_dtypes' (a TVM dependency)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def as_dtype(array: np.ndarray, name: str | None) -> np.ndarray:
    """np.load gives bfloat16 arrays back as raw 2-byte voids: view them as what they were."""
    return array.view(np_dtype(name)) if name and array.dtype.kind == "V" else array


def flatten(out) -> list:
    if hasattr(out, "numpy"):
        return [out]
    return [leaf for item in out for leaf in flatten(item)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
