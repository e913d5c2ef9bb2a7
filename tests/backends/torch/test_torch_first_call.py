"""Issue 15 item 10: a loaded torch artifact's first forward neither builds the C kernel nor measures
the machine (both happen at compile or load time; the kernel choices travel in kernels.json)."""
import json
import os
import subprocess
import sys

from moecc.cli import main

CODE = """
import json, sys, numpy as np
from moecc.backends.torch import machine, runtime, select, skinny
art = sys.argv[1]
run = runtime.load(art, json.load(open(art + "/manifest.json")))
def boom(*a, **k):
    raise AssertionError("built or measured inside a forward")
skinny._build = machine.measure = machine.measure_shape = select.measure_kernel = boom
for B, T in ((1, 1), (1, 5), (1, 40), (3, 200)):         # every token-count bucket
    (y,) = run([np.arange(B * T, dtype=np.int64).reshape(B, T) % 200])
    assert y.shape == (B, T, 256) and np.isfinite(y).all()
print("ok")
"""


def test_first_forward_builds_and_measures_nothing(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "art"
    assert main(["compile", "samples/tiny_gpt.py:build", "--upcycle", "4", "--top-k", "2", "--no-verify",
                 "--out", str(out)]) == 0
    tables = json.loads((out / "kernels.json").read_text())["tables"]
    assert tables and all(t.get("source") == "cost model" for t in tables.values())
    env = dict(os.environ, MOECC_CACHE_DIR=str(tmp_path / "fresh-cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CODE, str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
