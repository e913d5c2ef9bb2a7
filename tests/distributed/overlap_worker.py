"""One rank of the overlap tests: `python overlap_worker.py RANK WORLD PORT CASES OUT.json`.

CASES is a comma list of routings (see `routing`). Builds the same layer and global batch on every rank (seeded), runs moecc.distributed.overlap.moe_layer
on its slice of tokens through the delayed transport at every degree 1..8 (and 0: d=1 without overlap) in float32 and float64,
and writes, per (dtype, degree), the error against the single-process reference on the whole batch.
"""
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import moecc.ops  # noqa: F401
from moecc.distributed.comm import EPError, use_transport
from moecc.distributed.layout import LayerPlacement
from moecc.distributed.overlap import moe_layer
from moecc.distributed.timeline import Timeline
from moecc.distributed.transport import DelayedTransport
from moecc.ops import experts_reference, shared_expert
from moecc.spec import MoESpec, RouterSpec

E, K, H, F, T_RANK = 8, 3, 16, 24, 13


def routing(case: str, T: int, W: int, g: torch.Generator) -> torch.Tensor:
    """ids [T*W, K]: 'random'; 'one' (every token's first choice expert 0, rank 0 drowns);
    'empty' (experts 0..E/W-1, rank 0's, never chosen; -1 slots sprinkled)."""
    scores = torch.rand(T * W, E, generator=g)
    if case == "empty":
        scores[:, : E // W] = -1.0
    ids = torch.topk(scores, K, dim=1).indices
    if case == "one":
        rest = torch.topk(scores[:, 1:], K - 1, dim=1).indices + 1
        ids = torch.cat([torch.zeros_like(rest[:, :1]), rest], 1)
    if case == "empty":
        ids[::5, 2] = -1
    return ids


def _grads(x, ids, wts, w_in, w_out, spec, placement, d, shared, tokens, bd=None):
    """Gradients of sum(y * c) (c fixed) w.r.t. x, routing weights, local w_in / w_out at degree d
    (backward degree bd)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wts, w_in, w_out)]
    y = moe_layer(leaves[0], ids, leaves[1], leaves[2], leaves[3], spec, placement, degree=d,
                  shared=shared, tokens=tokens, backward_degree=bd)
    c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * c).sum().backward()
    return [t.grad for t in leaves]


def main(rank: int, world: int, port: int, cases: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    tl = Timeline(rank)
    comm = DelayedTransport(alpha=0.0, beta=0.0, timeline=tl)
    use_transport(comm)
    placement = LayerPlacement.contiguous("moe0", E, world)
    mine = placement.held(rank)
    results, grads = {}, {}
    for case, dtype in [(c, t) for c in cases.split(",") for t in (torch.float32, torch.float64)]:
        g = torch.Generator().manual_seed(7)
        spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=K),
                       shared_ffn=F)
        w_in = torch.randn(E, 2 * F, H, generator=g, dtype=dtype) / H ** 0.5
        w_out = torch.randn(E, H, F, generator=g, dtype=dtype) / F ** 0.5
        sh = (torch.randn(2 * F, H, generator=g, dtype=dtype) / H ** 0.5,
              torch.randn(H, F, generator=g, dtype=dtype) / F ** 0.5, None)
        x = torch.randn(T_RANK * world, H, generator=g, dtype=dtype)
        ids = routing(case, T_RANK, world, g)
        wts = torch.rand(ids.shape, generator=g, dtype=dtype)
        lo, hi = rank * T_RANK, (rank + 1) * T_RANK
        # the reference: experts on the whole batch; the shared expert on this rank's row block
        ref = experts_reference(x, ids, wts, w_in, w_out, None, None, spec)[lo:hi] \
            + shared_expert(x[lo:hi], *sh, spec)
        tokens = torch.arange(lo, hi).numpy()
        for d in range(1, 9):
            for overlap in (True, False) if d == 1 else (True,):
                y = moe_layer(x[lo:hi], ids[lo:hi], wts[lo:hi], w_in[mine], w_out[mine], spec, placement,
                              degree=d, overlap=overlap, shared=sh, tokens=tokens, timeline=tl)
                err = (y - ref).abs().max().item()
                results[f"{case}/{str(dtype)[6:]}/{d if overlap else 0}"] = {
                    "err": err, "scale": ref.abs().max().item(), "equal": bool(torch.equal(y, ref))}
        if case == "random":     # (degree, backward degree)
            grads[str(dtype)[6:]] = {db: _grads(x[lo:hi], ids[lo:hi], wts[lo:hi], w_in[mine], w_out[mine], spec,
                                                placement, db[0], sh, tokens, db[1]) for db in ((1, 1), (4, 4), (4, 2), (4, 1))}
    try:                         # rank 0 with another backward degree: every rank refuses, naming it
        moe_layer(x[lo:hi], ids[lo:hi], wts[lo:hi], w_in[mine], w_out[mine], spec, placement, degree=4,
                  tokens=tokens, backward_degree=2 if rank == 0 else 4)
        mismatch = None
    except EPError as e:
        mismatch = str(e)
    comm.close()
    gerr, same = {}, {}
    for dt, by_d in grads.items():              # d = 4 vs d = 1: max abs error / max |grad| per tensor
        gerr[dt] = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                       for a, b in zip(by_d[4, 4], by_d[1, 1]))
        same[dt] = {bd: all(torch.equal(a, b) for a, b in zip(by_d[4, bd], by_d[4, 4])) for bd in (1, 2)}
    with open(out, "w") as f:
        json.dump({"rank": rank, "results": results, "calls": comm.calls, "grad_rel_err": gerr,
                   "backward_degree_same": same, "mismatch": mismatch}, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                     # as moecc.distributed.launch: no teardown (train_worker.py says why)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
