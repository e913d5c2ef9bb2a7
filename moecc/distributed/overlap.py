"""Chunked expert-parallel MoE layer: the all-to-all of one chunk in flight while another computes.

    experts ⇒ split the rank's tokens into d chunks; plan each (layout); exchange split sizes (two collectives);
              dispatch × d (async, issued at once); shared expert (d >= 2: half of it) fills the
              first dispatch wait; per chunk: wait its dispatch → local experts → combine (async);
              (d >= 2: the other half of the shared expert fills the last combine wait);
              per chunk: wait its combine (= weigh and sum its tokens); + shared expert

Built from moecc.distributed.ep's steps (layout, exchange_sizes, dispatch, local_experts, combine);
the order is the one moecc.distributed.costmodel.pipeline predicts. overlap=False runs the same
steps at d = 1 waiting for each collective at once (the baseline without overlap).

Numerics: chunks are contiguous token ranges and keep their global token numbers, so every
(token, slot) goes to the same device; each expert sees its rows in (source rank, token, slot)
order and each token sums its outputs in ascending expert id (ep.py), so d = 1 equals the
single-process reference bit for bit (the shared expert on the rank's row block); d > 1 changes only
GEMM shapes (expert rows split by chunk, the shared expert in two row blocks): equal within 1e-6
relative in float32, 1e-12 in float64 (tests/distributed/test_overlap.py).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from moecc.distributed.comm import agree
from moecc.distributed.ep import Sizes, combine, dispatch, exchange_sizes, local_experts, token_numbers
from moecc.distributed.layout import LayerPlacement, layout
from moecc.ops import shared_expert
from moecc.spec import MoESpec


def chunk_bounds(tokens: int, degree: int) -> list[tuple[int, int]]:
    """d contiguous token ranges of nearly equal size (some empty when tokens < d)."""
    return [(tokens * i // degree, tokens * (i + 1) // degree) for i in range(degree)]


def _span(timeline, name: str):
    return timeline.span("compute", name) if timeline is not None else nullcontext()


def _exchange_all(lays, placement, group, layer: int, x: Tensor, where: str) -> list[Sizes]:
    """Split sizes of every chunk in two collectives, whatever d: chunk 0 through ep.exchange_sizes
    (which also checks that all ranks run the same layer, placement, hidden size and dtype), the
    other chunks' counts in one all_gather."""
    import torch.distributed as dist

    first = exchange_sizes(lays[0], placement, group, layer, x.shape[-1], x.dtype)
    if len(lays) == 1:
        return [first]
    W, rank = placement.world, dist.get_rank(group)
    vec = torch.tensor([n for lay in lays[1:] for n in (*lay.send, *lay.row_send)], dtype=torch.int64)
    table = agree(vec, group, where + ": chunk split sizes").view(W, len(lays) - 1, 2, W)
    out = [first]
    for c, lay in enumerate(lays[1:]):
        pairs, rows = table[:, c, 0], table[:, c, 1]                        # [W src, W dst]
        out.append(Sizes(lay.send, pairs[:, rank].tolist(), lay.row_send, rows[:, rank].tolist(), pairs, rows))
    return out


def _arrived(handle) -> None:
    """Block until a Dispatched / Combined handle's collectives have arrived (not counted as
    compute: what its wait() does afterwards is)."""
    pending = handle._pending
    for p in pending if isinstance(pending, tuple) else (pending,):
        p.wait()


def moe_layer(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec | str,
              placement: LayerPlacement, group=None, degree: int = 1, overlap: bool = True,
              b_in=None, b_out=None, shared=None, tokens: np.ndarray | None = None, layer: int = 0,
              kernel: str = "reference", timeline=None) -> Tensor:
    """x [T, H], ids/weights [T, S] (global expert ids), this rank's experts w_in [E_r, R, H],
    w_out [E_r, H, F]; shared = (w_in, w_out, gate) of the shared expert or None; tokens [T]: the
    tokens' global numbers (default: rank-major, one all_gather) -> y [T, H]."""
    import torch.distributed as dist

    rank, T = dist.get_rank(group), x.shape[0]
    where = f"layer {placement.name}"
    js = spec if isinstance(spec, str) else spec.to_json()
    if isinstance(spec, str):
        from moecc.ops import parse_spec
        spec = parse_spec(spec)
    if tokens is None:
        tokens = token_numbers(T, group, where)
    d = degree if overlap else 1
    bounds = chunk_bounds(T, d)
    with _span(timeline, f"{where} plan"):
        lays = [layout(ids[lo:hi], placement, rank, tokens[lo:hi]) for lo, hi in bounds]
    sizes = _exchange_all(lays, placement, group, layer, x, where)
    sl = [slice(lo, hi) for lo, hi in bounds]
    pend = [dispatch(x[s], weights[s], ids[s], lay, sz, group, f"{where} [{c}]", async_op=True)
            for c, (s, lay, sz) in enumerate(zip(sl, lays, sizes))]
    half = T // 2 if d > 1 else T
    ys = []
    if shared is not None and overlap:
        with _span(timeline, f"{where} shared"):
            ys.append(shared_expert(x[:half], *shared, spec))               # [T/2 or T, H]
    back = []
    for c in range(d):
        _arrived(pend[c])
        with _span(timeline, f"{where} experts[{c}]"):
            r = pend[c].wait()
            y_local = local_experts(r, w_in, w_out, b_in, b_out, js, kernel)   # [N_c, H]
        back.append(combine(y_local, ids[sl[c]], lays[c], sizes[c], group, f"{where} [{c}]",
                            async_op=True))
        if not overlap:
            _arrived(back[c])
    if shared is not None and (d > 1 or not overlap):
        with _span(timeline, f"{where} shared"):
            ys.append(shared_expert(x if not overlap else x[half:], *shared, spec))
    out = []
    for c in range(d):
        _arrived(back[c])
        with _span(timeline, f"{where} sum[{c}]"):
            out.append(back[c].wait())                                      # [T_c, H]
    y = torch.cat(out) if d > 1 else out[0]
    return y + torch.cat(ys) if ys else y
