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
return handles; wait() blocks and links the result into autograd; done() says whether wait() would
return at once. A dispatch is ONE all-to-all: per destination rank its hidden rows, then its pairs'
(routing weight, local expert id, row index), packed as bytes (pack_dispatch), so a chunk pays the
collective's latency once per direction. The backward all-to-alls are synchronous, issued by the
autograd engine in the same order on every rank (the chunked layer's pipelined backward,
moecc.distributed.overlap, issues them itself, async, from the reverse exchanges below).

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
from .pack import META, pack_dispatch, unpack_dispatch

_HEAD = 5       # agreed vector: [layer tag, placement fingerprint, hidden, dtype, backward degree], then counts
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


def size_vector(lays: list[Layout], placement: LayerPlacement, layer: int, hidden: int,
                dtype: torch.dtype, backward: int = 1) -> Tensor:
    """[5 + 2W * chunks] int64: the header every rank must agree on (layer, placement fingerprint,
    hidden, dtype, backward degree: it sets the backward's collectives), then per chunk its send
    counts (pairs, rows) to each rank."""
    code = _DTYPES.index(dtype) if dtype in _DTYPES else 99
    counts = [n for lay in lays for n in (*lay.send, *lay.row_send)]
    return torch.tensor([layer, placement.fingerprint(), hidden, code, backward, *counts], dtype=torch.int64)


def read_sizes(table: Tensor, lays: list[Layout], placement: LayerPlacement, group) -> list[Sizes]:
    """Every rank's size_vector, gathered (table [W, 5 + 2W * chunks]) -> one Sizes per chunk, after
    checking that all ranks are at the same layer with the same placement, hidden size and dtype: a
    disagreement is an EPError on every rank (naming the rank that differs), never a hang or a
    mis-shaped collective."""
    import torch.distributed as dist

    W, rank = placement.world, dist.get_rank(group)
    where = f"layer {placement.name}"
    for col, what in enumerate(("layer", "placement", "hidden size", "dtype", "backward overlap degree")):
        bad = torch.nonzero(table[:, col] != table[rank, col]).flatten().tolist()
        if bad:
            hint = ("give every rank the same overlap degrees" if col == 4 else
                    "ranks run different models or placements")
            raise fail(where, f"rank {bad[0]} disagrees on the {what} ({table[bad[0], col].item()} "
                       f"vs {table[rank, col].item()} here): {hint}", group)
    if table.shape[1] != _HEAD + 2 * W * len(lays):
        raise fail(where, f"ranks split the layer into different numbers of chunks ({table.shape[1]} "
                   f"counts, {_HEAD + 2 * W * len(lays)} here): give every rank the same degree", group)
    counts = table[:, _HEAD:].view(W, len(lays), 2, W)                     # [W src, chunk, 2, W dst]
    out = []
    for c, lay in enumerate(lays):
        pairs, rows = counts[:, c, 0], counts[:, c, 1]                      # [W src, W dst]
        out.append(Sizes(lay.send, pairs[:, rank].tolist(), lay.row_send, rows[:, rank].tolist(),
                         pairs, rows))
    return out


def check_world(placement: LayerPlacement, group) -> None:
    import torch.distributed as dist

    if dist.get_world_size(group) != placement.world:
        raise fail(f"layer {placement.name}", f"placement is for {placement.world} ranks, the process "
                   f"group has {dist.get_world_size(group)}", group)


def exchange_sizes(lay: Layout, placement: LayerPlacement, group, layer: int, hidden: int,
                   dtype: torch.dtype) -> Sizes:
    """All ranks gather every rank's send counts (one all_gather) and check them (read_sizes)."""
    check_world(placement, group)
    vec = size_vector([lay], placement, layer, hidden, dtype)
    table = agree(vec, group, f"layer {placement.name}: split sizes")     # [W, 5 + 2W]
    return read_sizes(table, [lay], placement, group)[0]


def token_grad(g: Tensor, lay: Layout, ids: Tensor) -> Tensor:
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


def combine_backward(g: Tensor, lay: Layout, sizes: Sizes, group, where: str, async_op: bool = False) -> Pending:
    """y's gradient g [T, H] per pair back to the experts' ranks (one row per pair, send order)."""
    return all_to_all(g[lay.token], sizes.send, sizes.recv, group, where + ": combine backward", async_op)


def hidden_backward(g: Tensor, sizes: Sizes, group, where: str, async_op: bool = False) -> Pending:
    """The received pairs' gradients g [N_recv, H] back to the ranks that sent them."""
    return all_to_all(g, sizes.recv, sizes.send, group, where + ": dispatch backward", async_op)


def weights_backward(g: Tensor, sizes: Sizes, group, where: str, async_op: bool = False) -> Pending:
    """The received routing weights' gradients g [N_recv, 1] back to the ranks that sent them."""
    return all_to_all(g, sizes.recv, sizes.send, group, where + ": weights backward", async_op)


def weight_grad(back: Tensor, lay: Layout, shape) -> Tensor:
    """weights_backward's rows [N_send, 1] -> the routing weights' gradient [T, S]."""
    return back.new_zeros(shape).index_put((lay.token, lay.slot), back[:, 0])


class _Hidden(torch.autograd.Function):
    """Received hidden rows -> one row per received pair; backward: the pairs' gradients go back
    (reverse all-to-all, one row per pair) and each token sums its own (token_grad)."""

    @staticmethod
    def forward(ctx, x, rows, pair_row, ids, lay, sizes, group, where):
        ctx.ids, ctx.lay, ctx.sizes, ctx.group, ctx.where = ids, lay, sizes, group, where
        return rows[pair_row]

    @staticmethod
    def backward(ctx, g):
        back = hidden_backward(g, ctx.sizes, ctx.group, ctx.where).wait()
        return token_grad(back, ctx.lay, ctx.ids), None, None, None, None, None, None, None


class _Weights(torch.autograd.Function):
    """Received routing weights [N, 1]; backward: their gradients back to [T, S]."""

    @staticmethod
    def forward(ctx, weights, received, lay, sizes, group, where):
        ctx.shape, ctx.lay, ctx.sizes, ctx.group, ctx.where = weights.shape, lay, sizes, group, where
        return received.clone()

    @staticmethod
    def backward(ctx, g):
        back = weights_backward(g, ctx.sizes, ctx.group, ctx.where).wait()
        return weight_grad(back, ctx.lay, ctx.shape), None, None, None, None, None


class _Combine(torch.autograd.Function):
    """Returned expert outputs (send order) -> y [T, H]; backward: y's gradient per pair back to
    the experts' ranks."""

    @staticmethod
    def forward(ctx, y_local, back, ids, lay, sizes, group, where):
        ctx.lay, ctx.sizes, ctx.group, ctx.where = lay, sizes, group, where
        return _sum_slots(back, ids, lay)

    @staticmethod
    def backward(ctx, g):
        g_local = combine_backward(g, ctx.lay, ctx.sizes, ctx.group, ctx.where).wait()
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
    _pending: Pending

    def done(self) -> bool:
        return self._pending.done()

    def _unpack(self):
        s = self._sizes
        rows, meta = unpack_dispatch(self._pending.wait(), s.row_recv, s.recv, self._x.shape[-1],
                                     self._x.dtype)
        w = meta[:, :1].view(torch.float64).to(self._weights.dtype)                # [N, 1]
        W = len(s.recv)
        src = torch.repeat_interleave(torch.arange(W, device=meta.device),
                                      torch.tensor(s.recv, device=meta.device))
        start = torch.tensor([0, *s.row_recv], device=meta.device).cumsum(0)[:-1]
        pair_row = meta[:, 2] + start[src]                                   # [N] into rows
        return rows, pair_row, w, meta[:, 1:2].contiguous()

    def wait(self) -> Received:
        rows, pair_row, w, local = self._unpack()
        args = (self._lay, self._sizes, self._group, self._where)
        return Received(_Hidden.apply(self._x, rows, pair_row, self._ids, *args),
                        _Weights.apply(self._weights, w, *args), local)

    def received(self) -> Received:
        """The received pairs as plain tensors (no autograd through the exchange: overlap's
        pipelined backward runs the reverse exchanges itself)."""
        rows, pair_row, w, local = self._unpack()
        return Received(rows[pair_row], w, local)


def dispatch_buffer(x: Tensor, weights: Tensor, lay: Layout) -> tuple[Tensor, list[int]]:
    """What a dispatch sends: (uint8 buffer, bytes per destination rank) (pack_dispatch)."""
    w = weights.detach()[lay.token, lay.slot].to(torch.float64).view(torch.int64)   # [N_send] bits
    meta = torch.stack([w, lay.local_id, lay.pair_row], dim=1)              # [N_send, META]
    return pack_dispatch(x.detach()[lay.row_token].contiguous(), meta, lay.row_send, lay.send)


def dispatch(x: Tensor, weights: Tensor, ids: Tensor, lay: Layout, sizes: Sizes, group,
             where: str = "dispatch", async_op: bool = False, packed=None) -> Dispatched:
    """x [T, H], weights [T, S], ids [T, S] -> the pairs this rank's experts compute, in ONE
    all-to-all (pack_dispatch): hidden rows (one per (token, rank)) and per pair (routing weight,
    local id, row). async_op: in flight until wait(). packed: dispatch_buffer(x, weights, lay),
    built earlier (while the split sizes were in flight)."""
    buf, nbytes = packed if packed is not None else dispatch_buffer(x, weights, lay)
    row_bytes = x.shape[-1] * x.element_size()
    recv = [r * row_bytes + m * META * 8 for r, m in zip(sizes.row_recv, sizes.recv)]
    pending = all_to_all(buf, nbytes, recv, group, where + ": dispatch hidden rows + pairs", async_op)
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

    def done(self) -> bool:
        return self._pending.done()

    def wait(self) -> Tensor:
        back = self._pending.wait()
        return _Combine.apply(self._y_local, back, self._ids, self._lay, self._sizes, self._group,
                              self._where)

    def summed(self) -> Tensor:
        """y [T, H] as plain tensors (overlap's pipelined backward sends y's gradient itself)."""
        return _sum_slots(self._pending.wait(), self._ids, self._lay)


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
