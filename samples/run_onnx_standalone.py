"""Run an ONNX artifact with onnxruntime + numpy only (no torch, no moecc), at a new token count.

    python samples/run_onnx_standalone.py out/tiny_gpt_moe [batch] [seq]
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

art = Path(sys.argv[1])
batch, seq = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (3, 21)
manifest = json.loads((art / "manifest.json").read_text())
session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {}
for spec, inp in zip(manifest["inputs"], session.get_inputs()):
    shape = [batch if i == 0 else seq for i in range(len(spec["shape"]))]
    feeds[inp.name] = rng.integers(0, 100, shape).astype(spec["dtype"]) if "int" in spec["dtype"] \
        else rng.standard_normal(shape).astype(spec["dtype"])
outputs = session.run(None, feeds)
assert "torch" not in sys.modules, "this runner must not import torch"
for o in outputs:
    print(f"onnxruntime ran {art.name} at batch={batch} seq={seq}: output {list(o.shape)}, "
          f"finite={bool(np.isfinite(o).all())}")
