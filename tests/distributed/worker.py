"""One rank of an expert-parallel test run: `python worker.py JOB.json RANK`.

JOB.json: {"world", "port", "timeout_s", "out", "cases": [case, ...], "fault": {...}?}. For each case
the rank takes its slice of the global batch (cases.problem) and the experts it holds, runs
moecc.distributed.ep.ep_experts forward and backward, and saves y, the gradients and the layout
(OUT/case<i>_rank<r>.pt). Faults: {"rank": r, "case": i, "kind": kill_dispatch | kill_combine |
stall | world | placement}. An EPError is printed as one line and the rank exits with code 3.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cases as C  # noqa: E402
from moecc.distributed import comm, ep  # noqa: E402


def run_case(i, case, rank, group, fault):
    p = C.problem(case)
    pl = C.placement(case)
    if fault.get("kind") == "placement" and fault["rank"] == rank and fault.get("case") == i:
        import numpy as np
        pl = type(pl)(pl.name, np.roll(pl.share, 1, axis=1), pl.local, pl.devices_per_node)
    sl = torch.as_tensor(C.rank_tokens(case, rank))
    held = pl.held(rank)
    x = p["x"][sl].clone().requires_grad_(True)
    w = p["weights"][sl].clone().requires_grad_(True)
    params = {n: p[n][held].clone().requires_grad_(True) for n in ("w_in", "w_out", "b_in", "b_out")
              if n in p}
    hit = fault.get("rank") == rank and fault.get("case") == i
    if hit and fault["kind"] == "kill_dispatch":
        def dying(*a, **k):
            os._exit(9)
        ep.dispatch = dying
    if hit and fault["kind"] == "kill_combine":
        def dying(*a, **k):
            os._exit(9)
        ep.combine = dying
    if hit and fault["kind"] == "stall":
        time.sleep(fault.get("sleep_s", 60))
    y, lay = ep.ep_experts(x, p["ids"][sl], w, params["w_in"], params["w_out"], params.get("b_in"),
                           params.get("b_out"), C.spec(case).to_json(), pl, group, layer=i,
                           tokens=sl.numpy())
    y.backward(p["grad"][sl])
    torch.save({"y": y.detach(), "grad_x": x.grad, "grad_weights": w.grad,
                **{f"grad_{n}": t.grad for n, t in params.items()},
                "held": held, "send": lay.send, "row_send": lay.row_send, "device": lay.device},
               os.path.join(job["out"], f"case{i}_rank{rank}.pt"))


if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    torch.set_num_threads(1)
    fault = job.get("fault") or {}
    world = job["world"] + (1 if fault.get("kind") == "world" and fault["rank"] == rank else 0)
    try:
        comm.init("gloo", job["timeout_s"], rank=rank, world_size=world,
                  init_method=f"tcp://127.0.0.1:{job['port']}")
        for i, case in enumerate(job["cases"]):
            run_case(i, case, rank, None, fault)
    except comm.EPError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(3)
    sys.stdout.flush()
    os._exit(0)      # no teardown collective: a finished rank does not wait on the others
