"""Expert parallelism for one layer: `experts` ⇒ dispatch → all-to-all → local experts → all-to-all
→ combine, on torch.distributed (gloo on CPU, nccl on GPU: only the backend differs).

    y = ep_experts(x, ids, weights, w_in_l, w_out_l, b_in_l, b_out_l, spec, placement, group, ...)

or in steps (the API the overlap schedule builds on; each step can run per chunk of tokens):

    lay  = layout(ids, placement, rank, tokens)                   moecc.distributed.layout
    sizes = exchange_sizes(lay, placement, group, layer)          split sizes, agreed by all ranks
    r    = dispatch(x, weights, ids, lay, sizes, group, where, async_op).wait()   -> Received
    y_l  = local_experts(r, w_in_l, w_out_l, b_in_l, b_out_l, spec, kernel)       [N_recv, H]
    y    = combine(y_l, ids, lay, sizes, group, where, async_op).wait()           [T, H]

dispatch/combine issue their all-to-alls at once (async_op=True: gloo/nccl work handles) and
return handles; wait() blocks and links the result into autograd. The backward all-to-alls are
synchronous, issued by the autograd engine in the same order on every rank.

Bit-identical to `torch.ops.moecc.experts` on the concatenated batch of all ranks (rank-major, each
expert one copy; with replicas: to the reference on the physical copies, see tests/distributed):
  - rows reach each expert in (source rank, token, slot) order (layout.py), so its GEMMs take the
    same operands as `experts_reference`;
  - the combine sums a token's weighted expert outputs into zeros in ascending expert id (the
    reference's index_add order);
  - backward: gradients travel the reverse all-to-all; the gradient of x sums a token's rows in
    descending expert id (the order autograd accumulates the reference's per-expert gathers);
    expert weight gradients are computed where the experts live: no rank needs another's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .comm import Pending, agree, all_to_all, fail
from .layout import LayerPlacement, Layout, layout

_HEAD = 4       # agreed vector: [layer tag, placement fingerprint, hidden, dtype], then counts
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Sizes:
    """Split sizes of one layer call, from one all_gather: identical on every rank."""
    send: list[int]          # [W] (token, slot) pairs this rank sends to each rank
    recv: list[int]          # [W] pairs it receives from each rank
    row_send: list[int]      # [W] hidden rows (distinct (token, rank)) it sends to each rank
    row_recv: list[int]      # [W] hidden rows it receives from each rank
    pairs: Tensor            # [W, W] pairs rank i sends rank j
    rows: Tensor             # [W, W] hidden rows rank i sends rank j


def exchange_sizes(lay: Layout, placement: LayerPlacement, group, layer: int, hidden: int,
                   dtype: torch.dtype) -> Sizes:
    """All ranks gather every rank's send counts (one all_gather), after checking that all are at
    the same layer with the same placement, hidden size and dtype: a disagreement is an EPError on
    every rank (naming the rank that differs), never a hang or a mis-shaped collective."""
    import torch.distributed as dist

    W, rank = placement.world, dist.get_rank(group)
    where = f"layer {placement.name}"
    if dist.get_world_size(group) != W:
        raise fail(where, f"placement is for {W} ranks, the process group has "
                   f"{dist.get_world_size(group)}", group)
    code = _DTYPES.index(dtype) if dtype in _DTYPES else 99
    vec = torch.tensor([layer, placement.fingerprint(), hidden, code, *lay.send, *lay.row_send],
                       dtype=torch.int64)
    table = agree(vec, group, where + ": split sizes")                     # [W, 4 + 2W]
    for col, what in enumerate(("layer", "placement", "hidden size", "dtype")):
        bad = torch.nonzero(table[:, col] != table[rank, col]).flatten().tolist()
        if bad:
            raise fail(where, f"rank {bad[0]} disagrees on the {what} ({table[bad[0], col].item()} "
                       f"vs {table[rank, col].item()} here): ranks run different models or "
                       "placements", group)
    pairs, rows = table[:, _HEAD:_HEAD + W], table[:, _HEAD + W:]
    return Sizes(lay.send, pairs[:, rank].tolist(), lay.row_send, rows[:, rank].tolist(), pairs, rows)


def _descending_sum(g: Tensor, lay: Layout, ids: Tensor) -> Tensor:
    """Per-pair gradients g [N_send, H] (send order) -> [T, H]: each token's pairs added into zeros
    in descending expert id (the order autograd accumulates the reference's per-expert gathers)."""
    T, S = ids.shape
    buf = g.new_zeros((T * S, *g.shape[1:])).index_put((lay.token * S + lay.slot,), g)
    buf = buf.view(T, S, *g.shape[1:])
    order = torch.argsort(ids, dim=1, descending=True, stable=True)         # [T, S]; -1 last
    rows = torch.arange(T, device=ids.device)
    gx = g.new_zeros((T, *g.shape[1:]))
    for j in range(S):
        gx = gx + buf[rows, order[:, j]]
    return gx


def _sum_slots(back: Tensor, ids: Tensor, lay: Layout) -> Tensor:
    """back [N_send, H] in send order -> y [T, H]: each token's rows added into zeros in ascending
    expert id (the reference's index_add order); empty slots add zero rows, which change nothing."""
    T, S = ids.shape
    buf = back.new_zeros((T * S, *back.shape[1:])).index_put((lay.token * S + lay.slot,), back)
    buf = buf.view(T, S, *back.shape[1:])
    order = torch.argsort(torch.where(ids < 0, torch.iinfo(ids.dtype).max, ids), dim=1, stable=True)
    rows = torch.arange(T, device=ids.device)
    y = back.new_zeros((T, *back.shape[1:]))
    for j in range(S):
        y = y + buf[rows, order[:, j]]
    return y


class _Hidden(torch.autograd.Function):
    """Received hidden rows -> one row per received pair; backward: the pairs' gradients go back
    (reverse all-to-all, one row per pair) and each token sums its own (_descending_sum)."""

    @staticmethod
    def forward(ctx, x, rows, pair_row, ids, lay, sizes, group, where):
        ctx.ids, ctx.lay, ctx.sizes, ctx.group, ctx.where = ids, lay, sizes, group, where
        return rows[pair_row]

    @staticmethod
    def backward(ctx, g):
        s = ctx.sizes
        back = all_to_all(g, s.recv, s.send, ctx.group, ctx.where + ": dispatch backward").wait()
        return _descending_sum(back, ctx.lay, ctx.ids), None, None, None, None, None, None, None


class _Weights(torch.autograd.Function):
    """Received routing weights [N, 1]; backward: their gradients back to [T, S]."""

    @staticmethod
    def forward(ctx, weights, received, lay, sizes, group, where):
        ctx.shape, ctx.lay, ctx.sizes, ctx.group, ctx.where = weights.shape, lay, sizes, group, where
        return received.clone()

    @staticmethod
    def backward(ctx, g):
        s, lay = ctx.sizes, ctx.lay
        back = all_to_all(g, s.recv, s.send, ctx.group, ctx.where + ": weights backward").wait()
        gw = g.new_zeros(ctx.shape).index_put((lay.token, lay.slot), back[:, 0])
        return gw, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """Returned expert outputs (send order) -> y [T, H]; backward: y's gradient per pair back to
    the experts' ranks."""

    @staticmethod
    def forward(ctx, y_local, back, ids, lay, sizes, group, where):
        ctx.lay, ctx.sizes, ctx.group, ctx.where = lay, sizes, group, where
        return _sum_slots(back, ids, lay)

    @staticmethod
    def backward(ctx, g):
        s = ctx.sizes
        g_local = all_to_all(g[ctx.lay.token], s.send, s.recv, ctx.group,
                             ctx.where + ": combine backward").wait()
        return g_local, None, None, None, None, None, None


@dataclass
class Received:
    """Pairs this rank's experts compute: x [N, H], weights [N, 1], local expert ids [N, 1]."""
    x: Tensor
    weights: Tensor
    ids: Tensor


@dataclass
class Dispatched:
    """A dispatch in flight; wait() -> Received."""
    _x: Tensor
    _weights: Tensor
    _ids: Tensor
    _lay: Layout
    _sizes: Sizes
    _group: object
    _where: str
    _pending: tuple

    def wait(self) -> Received:
        rows, w, meta = (p.wait() for p in self._pending)
        W = len(self._sizes.recv)
        src = torch.repeat_interleave(torch.arange(W, device=meta.device),
                                      torch.tensor(self._sizes.recv, device=meta.device))
        start = torch.tensor([0, *self._sizes.row_recv], device=meta.device).cumsum(0)[:-1]
        pair_row = meta[:, 1] + start[src]                                   # [N] into rows
        args = (self._lay, self._sizes, self._group, self._where)
        return Received(_Hidden.apply(self._x, rows, pair_row, self._ids, *args),
                        _Weights.apply(self._weights, w, *args), meta[:, :1].contiguous())


def dispatch(x: Tensor, weights: Tensor, ids: Tensor, lay: Layout, sizes: Sizes, group,
             where: str = "dispatch", async_op: bool = False) -> Dispatched:
    """x [T, H], weights [T, S], ids [T, S] -> the pairs this rank's experts compute. Three
    all-to-alls: hidden rows (one per (token, rank)), routing weights and (local id, row) per pair.
    async_op: in flight until wait()."""
    w = weights.detach()[lay.token, lay.slot].unsqueeze(-1)                 # [N_send, 1]
    meta = torch.stack([lay.local_id, lay.pair_row], dim=1)                 # [N_send, 2]
    pending = (all_to_all(x.detach()[lay.row_token], sizes.row_send, sizes.row_recv, group,
                          where + ": dispatch hidden", async_op),
               all_to_all(w, sizes.send, sizes.recv, group, where + ": dispatch weights", async_op),
               all_to_all(meta, sizes.send, sizes.recv, group, where + ": dispatch ids", async_op))
    return Dispatched(x, weights, ids, lay, sizes, group, where, pending)


def local_experts(r: Received, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                  b_out: Tensor | None, spec: str, kernel: str = "reference") -> Tensor:
    """The received pairs through this rank's experts (the experts op, local ids) -> [N, H], each
    row its one expert's weighted output."""
    return torch.ops.moecc.experts(r.x, r.ids, r.weights, w_in, w_out, b_in, b_out, spec, kernel)


@dataclass
class Combined:
    """A combine in flight; wait() -> y [T, H]."""
    _y_local: Tensor
    _ids: Tensor
    _lay: Layout
    _sizes: Sizes
    _group: object
    _where: str
    _pending: Pending

    def wait(self) -> Tensor:
        back = self._pending.wait()
        return _Combine.apply(self._y_local, back, self._ids, self._lay, self._sizes, self._group,
                              self._where)


def combine(y_local: Tensor, ids: Tensor, lay: Layout, sizes: Sizes, group,
            where: str = "combine", async_op: bool = False) -> Combined:
    """y_local [N_recv, H] back to the ranks that sent the pairs (one row per pair), summed per
    token at wait()."""
    pending = all_to_all(y_local, sizes.recv, sizes.send, group, where + ": combine", async_op)
    return Combined(y_local, ids, lay, sizes, group, where, pending)


def ep_experts(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor,
               b_in: Tensor | None, b_out: Tensor | None, spec: str, placement: LayerPlacement,
               group, layer: int = 0, tokens: np.ndarray | None = None,
               node: np.ndarray | None = None, kernel: str = "reference"):
    """One expert-parallel layer, synchronous: x [T, H], ids/weights [T, S], this rank's experts
    w_in [E_r, R, H], w_out [E_r, H, F] -> (y [T, H], layout). tokens [T]: the tokens' global
    numbers (default: rank-major, from the agreed counts of a first all_gather)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    where = f"layer {placement.name}"
    if tokens is None:
        tokens = token_numbers(x.shape[0], group, where)
    lay = layout(ids, placement, rank, tokens, node)
    sizes = exchange_sizes(lay, placement, group, layer, x.shape[-1], x.dtype)
    d = dispatch(x, weights, ids, lay, sizes, group, where).wait()
    y_local = local_experts(d, w_in, w_out, b_in, b_out, spec, kernel)
    return combine(y_local, ids, lay, sizes, group, where).wait(), lay


def token_numbers(T: int, group, where: str) -> np.ndarray:
    """[T] global numbers of this rank's tokens, numbered rank-major (one all_gather of counts)."""
    import torch.distributed as dist

    counts = agree(torch.tensor([T], dtype=torch.int64), group, where + ": token counts")[:, 0]
    start = int(counts[: dist.get_rank(group)].sum())
    return np.arange(start, start + T)
