"""Run an ONNX artifact with onnxruntime + numpy only (no torch, no moecc), at a new token count.

    python samples/run_onnx_standalone.py out/tiny_gpt_moe [batch] [seq]

Random inputs of that size, token ids within the range the manifest records; a size outside the
artifact's bounds (e.g. seq above its position table) is refused in one line, exit 2, before running.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def input_check():
    """backends/input_check.py (numpy only): from moecc if installed, else from this checkout."""
    try:
        from moecc.backends import input_check as module
        return module
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "backends" / "input_check.py"
        spec = importlib.util.spec_from_file_location("input_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def main(argv) -> int:
    art = Path(argv[1])
    batch, seq = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (3, 21)
    manifest = json.loads((art / "manifest.json").read_text())
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    arrays = []
    for spec in manifest["inputs"]:
        shape = [batch if i == 0 else seq for i in range(len(spec["shape"]))]
        shape = [d if isinstance(d, int) else n for d, n in zip(spec["shape"], shape)]
        if "int" in spec["dtype"]:
            v = spec.get("values") or {"min": 0, "max": 99}
            arrays.append(rng.integers(v["min"], v["max"] + 1, shape).astype(spec["dtype"]))
        else:
            arrays.append(rng.standard_normal(shape).astype(spec["dtype"]))
    checks = input_check()
    try:
        checks.check(arrays, manifest["inputs"])
    except checks.MoeccError as e:
        print(f"run_onnx_standalone: error: {e}", file=sys.stderr)
        return 2
    outputs = session.run(None, {inp.name: a for inp, a in zip(session.get_inputs(), arrays)})
    assert "torch" not in sys.modules, "this runner must not import torch"
    for o in outputs:
        print(f"onnxruntime ran {art.name} at batch={batch} seq={seq}: output {list(o.shape)}, "
              f"finite={bool(np.isfinite(o).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
