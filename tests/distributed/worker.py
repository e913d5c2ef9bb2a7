"""One rank of an expert-parallel test run: `python worker.py JOB.json RANK`, or main(job, rank) in
a forked child (harness.spawn(fork=True)).

JOB.json: {"world", "port", "timeout_s", "init_timeout_s"?, "out", "cases": [case, ...], "fault"?}.
For each case the rank takes its slice of the global batch (cases.problem) and the experts it holds,
runs moecc.distributed.ep.ep_experts forward and backward (a case with "degree" > 1: the chunked
layer, moecc.distributed.overlap.moe_layer, at that degree and "backward_degree", its pipelined
backward), and saves y, the gradients and the layout (OUT/case<i>_rank<r>.pt; no layout when chunked). A case with "carry" starts from the tokens' nodes after the
previous case (node-local experts: Layout.node, the placement metrics' rule). A fault {"rank", "case", "kind", "phase"?, "sleep_s"?} hits one
rank in one case:
  kill       the process dies (os._exit) when it reaches the collective named `phase` (a substring
             of the collective's label: "split sizes", "dispatch hidden", "combine", "combine
             backward", "dispatch backward", ...): its peers are inside that collective
  stall      it sleeps sleep_s there, then carries on
  placement  its placement differs from the others' (another plan)
  world      it starts with world size + 1
It writes OUT/fault_time (the time the fault fired). An EPError is printed as one line and the rank
exits with code 3; a finished rank exits 0 without a teardown collective.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cases as C  # noqa: E402
from moecc.distributed import comm, ep, overlap  # noqa: E402


def _mark(job):
    with open(os.path.join(job["out"], "fault_time"), "w") as f:
        f.write(repr(time.time()))


def _inject(job, fault):
    """Wrap ep's collectives (all_to_all, agree) so the fault fires at the named phase."""
    def wrap(fn, where_at):
        def inner(*a, **k):
            where = k.get("where", a[where_at] if len(a) > where_at else "")
            if fault["kind"] in ("kill", "stall") and fault.get("phase", "") in where:
                _mark(job)
                if fault["kind"] == "kill":
                    os._exit(9)
                fault["kind"] = "stalled"                # once
                time.sleep(fault.get("sleep_s", 10))
            return fn(*a, **k)
        return inner
    ep.all_to_all, ep.agree = wrap(ep.all_to_all, 4), wrap(ep.agree, 2)
    # the chunked layer's own collectives: its split sizes, its backward's grouped exchanges
    overlap.agree, comm.all_to_all = wrap(overlap.agree, 2), wrap(comm.all_to_all, 4)


def run_case(job, i, case, rank, group, fault, state):
    p = C.problem(case)
    pl = C.placement(case)
    hit = fault.get("rank") == rank and fault.get("case") == i
    if hit and fault["kind"] == "placement":
        pl = type(pl)(pl.name, np.roll(pl.share, 1, axis=1), pl.local, pl.devices_per_node)
        _mark(job)
    if hit and fault["kind"] in ("kill", "stall"):
        _inject(job, fault)
    sl = torch.as_tensor(C.rank_tokens(case, rank))
    held = pl.held(rank)
    x = p["x"][sl].clone().requires_grad_(True)
    w = p["weights"][sl].clone().requires_grad_(True)
    params = {n: p[n][held].clone().requires_grad_(True) for n in ("w_in", "w_out", "b_in", "b_out")
              if n in p}
    node = state.get("node") if case.get("carry") else None         # node-local: previous layer's
    extra = {}
    if case.get("degree", 1) > 1:
        y = overlap.moe_layer(x, p["ids"][sl], w, params["w_in"], params["w_out"], C.spec(case).to_json(), pl,
                              group, degree=case["degree"], b_in=params.get("b_in"), b_out=params.get("b_out"),
                              tokens=sl.numpy(), layer=i, backward_degree=case.get("backward_degree"))
        state["node"] = None
    else:
        y, lay = ep.ep_experts(x, p["ids"][sl], w, params["w_in"], params["w_out"], params.get("b_in"),
                               params.get("b_out"), C.spec(case).to_json(), pl, group, layer=i,
                               tokens=sl.numpy(), node=node)
        home = np.full(len(sl), rank // pl.devices_per_node)
        state["node"] = lay.node(home if node is None else node, pl)
        extra = {"send": lay.send, "row_send": lay.row_send, "device": lay.device}
    y.backward(p["grad"][sl])
    torch.save({"y": y.detach(), "grad_x": x.grad, "grad_weights": w.grad,
                **{f"grad_{n}": t.grad for n, t in params.items()}, "held": held, **extra},
               os.path.join(job["out"], f"case{i}_rank{rank}.pt"))


def main(job, rank):
    torch.set_num_threads(1)
    fault = dict(job.get("fault") or {})
    world = job["world"] + (1 if fault.get("kind") == "world" and fault["rank"] == rank else 0)
    try:
        if fault.get("kind") == "world" and fault["rank"] == rank:
            _mark(job)
        group = comm.init("gloo", job["timeout_s"], rank=rank, world_size=world,
                          init_method=f"tcp://127.0.0.1:{job['port']}",
                          init_timeout_s=job.get("init_timeout_s"))
        state = {}
        for i, case in enumerate(job["cases"]):
            run_case(job, i, case, rank, group, fault, state)
    except comm.EPError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(json.load(open(sys.argv[1])), int(sys.argv[2]))
