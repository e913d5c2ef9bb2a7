"""Chunked expert-parallel MoE layer: the all-to-all of one chunk in flight while another computes.

    experts ⇒ split tokens into d chunks;  counts a2a;  dispatch a2a × d (async, issued first);
              shared expert (fills the first dispatch wait);  per chunk: wait dispatch → local experts
              → combine a2a (async);  per chunk: wait combine → weigh and sum;  + shared expert

The order the cost model (moecc.distributed.costmodel.pipeline) predicts. Placement: contiguous
(expert e on rank e * W // E, local id = its position there). Row order, fixed: a rank sends each
chunk's rows grouped by destination rank, inside a group by local expert, then (token, slot); a rank
receives in source-rank order, so each expert sees its rows in (source rank, token, slot) order; with
tokens numbered rank-major that is the order `experts_reference` takes them on the concatenated
batch, so d = 1 equals the single-process reference bit for bit. The combine adds a token's expert
outputs in ascending expert order into zeros (as experts_reference), so chunking (d > 1) changes
only the GEMM shapes: equal within 1e-6 relative in float32, 1e-12 in float64.

`comm` is any object with all_to_all / all_to_all_async(t, send, recv, group, where) (the test
transport moecc.distributed.transport.DelayedTransport, or a thin wrapper of moecc.distributed.comm).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from moecc.ops import experts_reference, shared_expert, weigh
from moecc.spec import MoESpec


def chunk_bounds(tokens: int, degree: int) -> list[tuple[int, int]]:
    """d contiguous token ranges of nearly equal size (some empty when tokens < d)."""
    return [(tokens * i // degree, tokens * (i + 1) // degree) for i in range(degree)]


def _plan_chunk(ids: Tensor, lo: int, hi: int, world: int, experts: int):
    """Rows of chunk [lo, hi) in send order -> (token, slot, expert, counts [W, E_local])."""
    tok, slot = torch.where(ids[lo:hi] >= 0)                                # row-major
    e = ids[lo:hi][tok, slot]
    order = torch.argsort(e, stable=True)          # contiguous: by expert = by (rank, local e), then (t, s)
    tok, slot, e = tok[order] + lo, slot[order], e[order]
    counts = torch.bincount(e, minlength=experts).reshape(world, experts // world)   # [W, E_local]
    return tok, slot, e, counts


def _span(timeline, name):
    return timeline.span("compute", name) if timeline is not None else nullcontext()


def moe_layer(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec,
              comm, group=None, degree: int = 1, b_in=None, b_out=None, shared=None,
              timeline=None, where: str = "layer") -> Tensor:
    """x [T, H], ids/weights [T, S] (global expert ids), w_in/w_out: this rank's experts
    [E/W, R, H] / [E/W, H, F]; shared = (w_in, w_out, gate) of the shared expert or None -> y [T, H]."""
    import torch.distributed as dist
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    E, per, T = spec.num_experts, w_in.shape[0], x.shape[0]
    bounds = chunk_bounds(T, degree)
    with _span(timeline, f"{where} plan"):
        plans = [_plan_chunk(ids, lo, hi, W, E) for lo, hi in bounds]
        counts = torch.stack([p[3] for p in plans], 1)                      # [W, d, E_local]
    rcounts = comm.all_to_all(counts.reshape(W, -1), [1] * W, [1] * W, group,
                              f"{where} counts").reshape(W, degree, per)    # [W src, d, E_local]
    send = counts.sum(2).tolist()                                           # [W][d]
    recv = rcounts.sum(2).tolist()
    pend = []
    for c, (tok, _, _, _) in enumerate(plans):                              # dispatch: all issued now
        with _span(timeline, f"{where} pack[{c}]"):
            xs = x[tok]                                                     # [N_c, H]
        pend.append(comm.all_to_all_async(xs, [s[c] for s in send], [r[c] for r in recv], group,
                                          f"{where} dispatch[{c}]"))
    ys = None
    if shared is not None:
        with _span(timeline, f"{where} shared"):
            ys = shared_expert(x, shared[0], shared[1], shared[2], spec)    # [T, H]
    back = []
    for c in range(degree):
        xr = pend[c].wait()                                                 # [M_c, H] (src, e, t, s)
        with _span(timeline, f"{where} experts[{c}]"):
            n = rcounts[:, c].reshape(-1)                                   # [W * E_local]
            local = torch.arange(per).repeat(W).repeat_interleave(n)        # [M_c] local expert id
            h = experts_reference(xr, local.unsqueeze(1), torch.ones(xr.shape[0], 1, dtype=xr.dtype),
                                  w_in, w_out, b_in, b_out, spec)           # [M_c, H] unweighted
        back.append(comm.all_to_all_async(h, [r[c] for r in recv], [s[c] for s in send], group,
                                          f"{where} combine[{c}]"))
    y = torch.zeros_like(x)
    for c, (tok, slot, e, _) in enumerate(plans):
        h = back[c].wait()                                                  # [N_c, H] in send order
        with _span(timeline, f"{where} combine-sum[{c}]"):
            hw = weigh(h, weights[tok, slot].unsqueeze(-1), spec)
            for ex in torch.unique(e).tolist():                             # ascending expert order
                m = e == ex
                y.index_add_(0, tok[m], hw[m])
    if ys is not None:
        y = y + ys
    return y
