"""Start W ranks of a worker script as processes on 127.0.0.1 (gloo), bounded in time."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, world: int, args: list[str], tmp: Path, timeout: float = 120) -> list[dict]:
    """Each rank runs `python script RANK WORLD PORT *args OUT.json`; returns the ranks' JSON."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [tmp / f"rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port), *args, str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{logs[r][-3000:] if r < len(logs) else ''}"
    return [json.loads(o.read_text()) for o in outs]
