"""The first call of a loaded artifact against a warm call (issue 15 item 10: within 3×).

    OMP_NUM_THREADS=1 python samples/first_call.py [--backends torch,onnx,tvm] [--runs 5] [--artifact DIR ...]

Compiles samples/tiny_gpt.py upcycled to 8 experts, top-2, for each backend (or takes --artifact), then
runs it in --runs fresh processes per cache state: "fresh" (an empty MOECC_CACHE_DIR: the C kernel is
built at load) and "warm" (the cache the previous runs filled). Each process times the load, the first
call and the median of 20 further calls on the same input (1 × 12 tokens). Prints a markdown table of
the medians over the processes; the ratio is first / warm, in wall clock (run it on a quiet machine)
and in process CPU time (robust on a shared one, at OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from moecc import backends
from moecc.artifact import read_manifest
art = sys.argv[1]
manifest = read_manifest(art)
t1 = time.perf_counter()
run = backends.runtime(manifest["backend"]["name"]).load(art, manifest)
t2 = time.perf_counter()
x = [np.arange(12, dtype=np.int64).reshape(1, 12) % 200]
c2 = time.process_time()
run(x)
t3, c3 = time.perf_counter(), time.process_time()
warm, cpu = [], []
for _ in range(20):
    a, c = time.perf_counter(), time.process_time()
    run(x)
    warm.append(time.perf_counter() - a)
    cpu.append(time.process_time() - c)
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2, "warm": sorted(warm)[10],
                  "first_cpu": c3 - c2, "warm_cpu": sorted(cpu)[10]}))
"""


def compile_artifact(backend: str, out: Path) -> Path:
    from moecc.cli import main
    args = ["compile", "samples/tiny_gpt.py:build", "--upcycle", "8", "--top-k", "2", "--to", backend,
            "--out", str(out), "-q"]
    if main(args) != 0:
        raise SystemExit(f"compiling the {backend} artifact failed")
    return out


def measure(art: Path, cache: Path) -> dict:
    env = dict(os.environ, MOECC_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", CHILD, str(art)], capture_output=True, text=True, env=env,
                       cwd=ROOT, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--artifact", type=Path, action="append", help="measure this artifact (repeatable) instead of "
                   "compiling tiny_gpt")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        arts = {p.name: p for p in a.artifact} if a.artifact else \
            {b: compile_artifact(b, Path(tmp) / b) for b in a.backends.split(",")}
        for name, art in arts.items():
            warm_cache = Path(tmp) / f"cache-{name}"
            for state in ("fresh", "warm"):
                if state == "warm":
                    measure(art, warm_cache)                  # fills the warm cache (not counted)
                runs = []
                for i in range(a.runs):
                    cache = Path(tmp) / f"fresh-{name}-{i}" if state == "fresh" else warm_cache
                    runs.append(measure(art, cache))
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                ratios = sorted(r["first"] / r["warm"] for r in runs)
                cpu = statistics.median(r["first_cpu"] / max(r["warm_cpu"], 1e-6) for r in runs)
                rows.append((name, state, med, statistics.median(ratios), ratios[-1], cpu))
    print(f"first call of a loaded artifact vs a warm call ({a.runs} fresh processes each, medians, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print("| artifact | cache | load s | first ms | warm ms | first / warm (median) | (worst) | CPU-time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, state, m, ratio, worst, cpu in rows:
        print(f"| {name} | {state} | {m['load']:.2f} | {1e3 * m['first']:.1f} | {1e3 * m['warm']:.1f} | "
              f"{ratio:.2f} | {worst:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
