"""Run an ONNX artifact with onnxruntime and numpy only (no torch): usable standalone next to model.onnx.

    run_onnx(model_path, inputs: list[np.ndarray]) -> list[np.ndarray]
    load(artifact_dir, manifest) -> run(inputs) -> outputs

Inputs are matched to the model's inputs by position and cast to the dtype each one declares
(e.g. int32 token ids for an int64 input).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

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

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def session(model_path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; `threads` intra-op threads (None: $OMP_NUM_THREADS if set, else
    onnxruntime's default of one per core)."""
    so = ort.SessionOptions()
    env = os.environ.get("OMP_NUM_THREADS", "")
    threads = threads or (int(env) if env.isdigit() else 0)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession, specs: list[dict] | None = None):
    """`run(inputs)`; `specs` (the manifest's inputs) bound ids and dims before onnxruntime sees them."""
    wanted = sess.get_inputs()
    names = [o.name for o in sess.get_outputs()]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        check(inputs, specs)
        if len(inputs) != len(wanted):
            raise MoeccError(f"the model takes {len(wanted)} inputs ({', '.join(i.name for i in wanted)}), "
                             f"got {len(inputs)}")
        feed = {}
        for spec, a in zip(wanted, inputs):
            a = np.asarray(a)
            dtype = _NP.get(spec.type)
            feed[spec.name] = np.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))
        return sess.run(names, feed)
    return run


def run_onnx(model_path, inputs: list[np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """Load `model_path` and run it once on `inputs` (a list of arrays, in the model's input order)."""
    return runner(session(model_path, threads))(inputs)


def load(artifact_dir, manifest: dict | None = None, threads: int | None = None):
    """`run(inputs) -> outputs` for the artifact's model.onnx (the file named in the manifest, if any);
    inputs outside the bounds in the manifest (given, else DIR/manifest.json) are refused."""
    manifest = manifest or _manifest(Path(artifact_dir))
    files = (manifest.get("backend") or {}).get("files") or manifest.get("files") or []
    name = next((f for f in files if str(f).endswith(".onnx")), "model.onnx")
    path = Path(artifact_dir) / name
    if not path.exists():
        raise MoeccError(f"{artifact_dir}: no {name}; is this an ONNX artifact (moecc compile --to onnx)?")
    return runner(session(path, threads), manifest.get("inputs"))


def _manifest(artifact: Path) -> dict:
    try:
        return json.loads((artifact / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
