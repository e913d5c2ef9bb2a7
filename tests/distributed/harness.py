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
    ended: float           # time.time() when its exit was seen
    stderr: str


def spawn(tmp: Path, world: int, cases: list, timeout_s: float = 20.0, fault: dict | None = None,
          deadline_s: float = 120.0, fork: bool = False, init_timeout_s: float | None = None
          ) -> list[RankResult]:
    """Run worker.py on `world` ranks; a rank still running at deadline_s is killed (code None).
    fork: children forked from this process (torch and moecc already imported: ~0.1 s instead of
    seconds of imports; for a driver process that has no process group of its own)."""
    tmp.mkdir(parents=True, exist_ok=True)
    job = {"world": world, "port": free_port(), "timeout_s": timeout_s, "out": str(tmp),
           "cases": cases, "fault": fault, "init_timeout_s": init_timeout_s or max(timeout_s, 60)}
    (tmp / "job.json").write_text(json.dumps(job))
    t0 = time.time()
    if fork:
        import multiprocessing as mp
        procs = [mp.get_context("fork").Process(target=_child, args=(job, r, tmp / f"rank{r}.err"))
                 for r in range(world)]
        for p in procs:
            p.start()
        code = lambda p: p.exitcode                                     # noqa: E731
        err = lambda r, p: (tmp / f"rank{r}.err").read_text() if (tmp / f"rank{r}.err").exists() else ""  # noqa: E731
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp / "job.json"), str(r)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        code = lambda p: p.poll()                                       # noqa: E731
        err = lambda r, p: p.stderr.read()                              # noqa: E731
    done: dict[int, RankResult] = {}
    while len(done) < world:
        for r, p in enumerate(procs):
            if r not in done and code(p) is not None:
                done[r] = RankResult(r, code(p), time.time(), err(r, p))
        if time.time() - t0 > deadline_s:
            for r, p in enumerate(procs):
                if r not in done:
                    p.kill()
                    p.join() if fork else p.wait()
                    done[r] = RankResult(r, None, time.time(), err(r, p))
        time.sleep(0.02)
    return [done[r] for r in range(world)]


def _child(job, rank, errpath):
    fd = os.open(errpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)        # not pytest's captured stream
    import worker
    worker.main(job, rank)


def fault_time(tmp: Path) -> float | None:
    f = tmp / "fault_time"
    return float(f.read_text()) if f.exists() else None


def load(tmp: Path, case: int, rank: int) -> dict:
    return torch.load(tmp / f"case{case}_rank{rank}.pt", weights_only=False)
