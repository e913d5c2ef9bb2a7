"""Spawn W worker processes (real gloo groups on 127.0.0.1, a free port), bounded in time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moecc.distributed.comm import free_port

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    code: int | None       # None: still running at the deadline (a hang; it was killed)
    seconds: float
    stderr: str


def spawn(tmp: Path, world: int, cases: list, timeout_s: float = 20.0, fault: dict | None = None,
          deadline_s: float = 120.0) -> list[RankResult]:
    tmp.mkdir(parents=True, exist_ok=True)
    job = tmp / "job.json"
    job.write_text(json.dumps({"world": world, "port": free_port(), "timeout_s": timeout_s,
                               "out": str(tmp), "cases": cases, "fault": fault}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(job), str(r)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    done: dict[int, RankResult] = {}
    while len(done) < world:
        for r, p in enumerate(procs):
            if r not in done and p.poll() is not None:
                done[r] = RankResult(r, p.returncode, time.monotonic() - t0, p.stderr.read())
        if time.monotonic() - t0 > deadline_s:
            for r, p in enumerate(procs):
                if r not in done:
                    p.kill()
                    p.wait()
                    done[r] = RankResult(r, None, time.monotonic() - t0, p.stderr.read())
        time.sleep(0.05)
    return [done[r] for r in range(world)]


def load(tmp: Path, case: int, rank: int) -> dict:
    return torch.load(tmp / f"case{case}_rank{rank}.pt", weights_only=False)
