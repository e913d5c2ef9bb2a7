"""Expert parallelism for one layer: `experts` ⇒ dispatch → all-to-all → local experts → all-to-all
→ combine, on torch.distributed (gloo on CPU, nccl on GPU: only the backend differs).

    y = ep_experts(x, ids, weights, w_in_l, w_out_l, b_in_l, b_out_l, spec, placement, group, ...)

or in steps (the API the overlap schedule builds on; each step can run per chunk of tokens):

    lay  = layout(ids, placement, rank, tokens)                   moecc.distributed.layout
    sizes = exchange_sizes(lay, placement, group, layer)          split sizes, agreed by all ranks
    h    = dispatch(x, weights, ids, lay, sizes, group, async_op) -> Dispatched (.wait() if async)
    y_l  = local_experts(h, w_in_l, w_out_l, b_in_l, b_out_l, spec, kernel)   [N_recv, H]
    y    = combine(y_l, ids, lay, sizes, group, async_op)         -> Combined  (.wait() -> [T, H])

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

from .comm import Pending, agree, all_to_all, all_to_all_async, fail
from .layout import LayerPlacement, Layout, layout

_HEAD = 4       # agreed vector: [layer tag, placement fingerprint, hidden, dtype] + send counts [W]
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Sizes:
    send: list[int]      # [W] rows this rank sends to each rank
    recv: list[int]      # [W] rows it receives from each rank
    counts: Tensor       # [W, W] rows rank i sends rank j (identical on every rank)


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
    vec = torch.tensor([layer, placement.fingerprint(), hidden, code, *lay.send], dtype=torch.int64)
    table = agree(vec, group, where + ": split sizes")                     # [W, 4 + W]
    for col, what in enumerate(("layer", "placement", "hidden size", "dtype")):
        bad = torch.nonzero(table[:, col] != table[rank, col]).flatten().tolist()
        if bad:
            raise fail(where, f"rank {bad[0]} disagrees on the {what} ({table[bad[0], col].item()} "
                       f"vs {table[rank, col].item()} here): ranks run different models or "
                       "placements", group)
    counts = table[:, _HEAD:]
    return Sizes(lay.send, counts[:, rank].tolist(), counts)


class _Gather(torch.autograd.Function):
    """x [T, H] -> rows x[token] [N, H]; backward sums a token's row gradients in descending
    expert id (empty slots: zero rows, which change nothing), like the reference's autograd."""

    @staticmethod
    def forward(ctx, x, token, slot, ids):
        ctx.save_for_backward(token, slot, ids)
        return x[token]

    @staticmethod
    def backward(ctx, g):
        token, slot, ids = ctx.saved_tensors
        T, S = ids.shape
        buf = g.new_zeros((T * S, *g.shape[1:]))
        buf[token * S + slot] = g
        buf = buf.view(T, S, *g.shape[1:])
        order = torch.argsort(ids, dim=1, descending=True, stable=True)     # [T, S]
        rows = torch.arange(T, device=ids.device)
        gx = g.new_zeros((T, *g.shape[1:]))
        for j in range(S):
            gx = gx + buf[rows, order[:, j]]
        return gx, None, None, None


@dataclass
class Dispatched:
    """Rows received for the local experts: x [N, H], weights [N, 1], local ids [N, 1]."""
    x: Tensor | Pending
    weights: Tensor | Pending
    ids: Tensor | Pending

    def wait(self) -> "Dispatched":
        get = lambda t: t.wait() if isinstance(t, Pending) else t          # noqa: E731
        return Dispatched(get(self.x), get(self.weights), get(self.ids))


def dispatch(x: Tensor, weights: Tensor, ids: Tensor, lay: Layout, sizes: Sizes, group,
             where: str = "dispatch", async_op: bool = False) -> Dispatched:
    """x [T, H], weights [T, S], ids [T, S] -> the rows this rank's experts compute (three
    all-to-alls: hidden rows, routing weights, local expert ids). async_op: in flight until wait()."""
    rows = _Gather.apply(x, lay.token, lay.slot, ids)                       # [N_send, H]
    w = weights[lay.token, lay.slot].unsqueeze(-1)                          # [N_send, 1]
    a2a = all_to_all_async if async_op else all_to_all
    return Dispatched(a2a(rows, sizes.send, sizes.recv, group, where + ": dispatch hidden"),
                      a2a(w, sizes.send, sizes.recv, group, where + ": dispatch weights"),
                      a2a(lay.local_id.unsqueeze(-1), sizes.send, sizes.recv, group,
                          where + ": dispatch ids"))


def local_experts(d: Dispatched, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                  b_out: Tensor | None, spec: str, kernel: str = "reference") -> Tensor:
    """The received rows through this rank's experts (the experts op, local ids) -> [N, H], each
    row its one expert's weighted output."""
    return torch.ops.moecc.experts(d.x, d.ids, d.weights, w_in, w_out, b_in, b_out, spec, kernel)


class Combined:
    """The combine in flight: wait() -> y [T, H]."""

    def __init__(self, back, ids: Tensor, lay: Layout):
        self._back, self._ids, self._lay = back, ids, lay

    def wait(self) -> Tensor:
        back = self._back.wait() if isinstance(self._back, Pending) else self._back
        return _sum_slots(back, self._ids, self._lay)


def combine(y_local: Tensor, ids: Tensor, lay: Layout, sizes: Sizes, group,
            where: str = "combine", async_op: bool = False) -> Combined:
    """y_local [N_recv, H] back to the ranks that sent the rows, summed per token."""
    a2a = all_to_all_async if async_op else all_to_all
    return Combined(a2a(y_local, sizes.recv, sizes.send, group, where + ": combine"), ids, lay)


def _sum_slots(back: Tensor, ids: Tensor, lay: Layout) -> Tensor:
    """back [N_send, H] in send order -> y [T, H]: each token's rows added into zeros in ascending
    expert id (the reference's order)."""
    T, S = ids.shape
    buf = back.new_zeros((T * S, *back.shape[1:])).index_put((lay.token * S + lay.slot,), back)
    buf = buf.view(T, S, *back.shape[1:])
    order = torch.argsort(torch.where(ids < 0, torch.iinfo(ids.dtype).max, ids), dim=1, stable=True)
    rows = torch.arange(T, device=ids.device)
    y = back.new_zeros((T, *back.shape[1:]))
    for j in range(S):
        y = y + buf[rows, order[:, j]]
    return y


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
    d = dispatch(x, weights, ids, lay, sizes, group, where)
    y_local = local_experts(d, w_in, w_out, b_in, b_out, spec, kernel)
    return combine(y_local, ids, lay, sizes, group, where).wait(), lay


def token_numbers(T: int, group, where: str) -> np.ndarray:
    """[T] global numbers of this rank's tokens, numbered rank-major (one all_gather of counts)."""
    import torch.distributed as dist

    counts = agree(torch.tensor([T], dtype=torch.int64), group, where + ": token counts")[:, 0]
    start = int(counts[: dist.get_rank(group)].sum())
    return np.arange(start, start + T)
