"""Chunked expert-parallel MoE layer: the all-to-all of one chunk in flight while another computes.

    experts ⇒ split the rank's tokens into d chunks; plan each (layout); split sizes of all chunks
              (one collective, in flight while every chunk's dispatch buffer is packed);
              dispatch × d (one all-to-all each, async, issued at once);
              per chunk: [shared-expert blocks while its dispatch is in flight] → wait → local
              experts → combine (async); per chunk: [shared-expert blocks while its combine is in
              flight] → wait → weigh and sum its tokens; the shared-expert blocks left; + shared

The shared expert (compute independent of the exchanged tokens) is cut into fixed row blocks (one at
d = 1, 2d above) and run greedily, a block at a time, whenever the schedule would otherwise wait for
a collective that has not arrived: it fills the first dispatch wait, then any later wait, the last
combine's above all. Every wait is placed as late as the data allows (a chunk's dispatch right
before its experts, its combine right before its sum). moecc.distributed.costmodel.pipeline
predicts exactly this order. overlap=False runs the same steps at d = 1, waiting for each
collective at once and computing the shared expert after them (the baseline without overlap).

Training (PIPELINED_BACKWARD): the backward runs its own pipeline at the backward degree b, a divisor
of d (backward_degree; consecutive forward chunks merged, one exchange per group and direction):

    backward ⇒ combine backward × b (async, issued at once); per group (last first): [shared-expert
               backward blocks while its exchange is in flight] → wait → each chunk's expert
               backward → its x and routing-weight gradients back (one exchange, async); per group:
               wait → token sums; the shared-expert blocks left
costmodel.backward_pipeline predicts it; costmodel.choose_degrees picks (d, b) together.

Numerics: chunks are contiguous token ranges and keep their global token numbers, so every
(token, slot) goes to the same device; each expert sees its rows in (source rank, token, slot)
order and each token sums its outputs in ascending expert id (ep.py), so d = 1 equals the
single-process reference bit for bit (the shared expert on the rank's row block, whole); d > 1
changes only GEMM shapes (expert rows split by chunk, the shared expert in 2d row blocks — fixed
blocks, so when each block runs never changes the result): equal within 1e-6 relative in float32,
1e-12 in float64 (tests/distributed/test_overlap.py).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moecc.distributed.comm import agree, all_to_all_grouped, fail
from moecc.distributed.ep import (check_world, combine, dispatch, dispatch_buffer, local_experts,
                                  read_sizes, size_vector, token_grad, token_numbers, weight_grad)
from moecc.distributed.filler import Filler, add_grads, grads_by_id, span
from moecc.distributed.layout import LayerPlacement, layout
from moecc.spec import MoESpec


def chunk_bounds(tokens: int, degree: int) -> list[tuple[int, int]]:
    """d contiguous token ranges of nearly equal size (some empty when tokens < d)."""
    return [(tokens * i // degree, tokens * (i + 1) // degree) for i in range(degree)]


def backward_degree_for(degree: int, backward: int | None, where: str = "overlap", group=None) -> int:
    """The backward degree of a layer run in `degree` chunks: `backward` (default: degree), which
    must divide degree: the backward merges consecutive forward chunks (each chunk's expert backward
    needs its own saved forward; splitting a chunk would recompute it)."""
    if backward is None:
        return degree
    if not isinstance(backward, int) or backward < 1 or degree % backward:
        ok = [b for b in range(1, degree + 1) if degree % b == 0]
        raise fail(where, f"backward overlap degree {backward!r} must divide the forward degree {degree} "
                   f"(one of {ok}): the backward merges consecutive forward chunks", group)
    return backward


def shared_blocks(tokens: int, degree: int) -> list[tuple[int, int]]:
    """Row blocks the shared expert is computed in: the whole batch at d = 1 (bit-identical to the
    reference), 2d blocks above (each small enough to fill a chunk's wait without delaying it much)."""
    return [b for b in chunk_bounds(tokens, 1 if degree == 1 else 2 * degree) if b[1] > b[0]]


def _arrived(handle) -> None:
    """Block until a Dispatched / Combined handle's collective has arrived (not counted as
    compute: what its wait() does afterwards is)."""
    handle._pending.wait()


def moe_layer(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec | str,
              placement: LayerPlacement, group=None, degree: int = 1, overlap: bool = True,
              b_in=None, b_out=None, shared=None, tokens: np.ndarray | None = None, layer: int = 0,
              kernel: str = "reference", timeline=None, backward_degree: int | None = None) -> Tensor:
    """x [T, H], ids/weights [T, S] (global expert ids), this rank's experts w_in [E_r, R, H],
    w_out [E_r, H, F]; shared = (w_in, w_out, gate) of the shared expert or None; tokens [T]: the
    tokens' global numbers (default: rank-major, one all_gather) -> y [T, H]. backward_degree: the
    backward's exchanges per direction in training (a divisor of degree, default degree)."""
    return issue(x, ids, weights, w_in, w_out, spec, placement, group, degree, overlap, b_in, b_out,
                 shared, tokens, layer, kernel, timeline, backward_degree).finish()


PIPELINED_BACKWARD = True
"""Training (d > 1, a gradient needed): the chunked layer is one autograd node (_Pipelined) whose
backward runs its own pipeline instead of autograd's chunk-by-chunk waits: every chunk's combine
backward (y's gradient per pair to the experts' ranks) is issued at once, then per chunk, in the order
autograd ran them (last first): wait for it, the experts' backward, and its weights / dispatch backward
issued without waiting; each chunk's token sums once its exchange is back. Each chunk's expert backward
computes while the later chunks' exchanges are in flight (autograd ran every combine backward, each
waited for, before any expert backward). The same rows exchanged, the same sums in the same order:
gradients bit-identical to autograd's. The backward degree (backward_degree, a divisor of d) groups
consecutive forward chunks: one exchange per group and direction (fewer latencies when the backward,
with twice the forward's compute for the same traffic, needs fewer chunks to hide it); the x and
routing-weight gradients of a group travel as one exchange."""


class LayerInFlight:
    """A layer whose dispatches are in flight (issue); finish() -> y [T, H]. Whatever runs between
    the two (the graph's ops independent of this layer's output: its shared expert, ...) fills the
    first dispatch wait (passes/expert_parallel splits the layer's node in two for that)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def finish(self) -> Tensor:
        tensors = (self.x, self.weights, self.w_in, self.w_out, self.b_in, self.b_out,
                   *(self.fill.shared or ()))
        if (PIPELINED_BACKWARD and self.overlap and self.d > 1 and torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors)):
            return _Pipelined.apply(self, *tensors)          # the shared expert's output included
        y = self._schedule(train=False)
        ys = self.fill.result()
        return y if ys is None else y + ys

    def _schedule(self, train: bool) -> Tensor:
        """The forward schedule -> the routed experts' y [T, H]; train: y + the shared expert's, no
        autograd through the exchanges, each chunk's experts and each shared-expert block recorded on
        leaf copies for _backward (self.saved, the filler)."""
        d, tl, where, fill, pend = self.d, self.timeline, self.where, self.fill, self.pend
        params = (self.w_in, self.w_out, self.b_in, self.b_out)
        if train:
            fill.record()                        # the shared expert's blocks on leaves, for _backward
            params = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in params)
            self.saved, self.leaves = [], params
        back = []
        for c in range(d):
            if self.overlap:
                fill.until(pend[c])              # the shared expert fills the dispatch wait
            _arrived(pend[c])
            with span(tl, f"{where} experts[{c}]"):
                if train:
                    r = pend[c].received()
                    r.x.requires_grad_(self.x.requires_grad)
                    r.weights.requires_grad_(self.weights.requires_grad)
                    with torch.enable_grad():
                        y_local = local_experts(r, *params, self.js, self.kernel)        # [N_c, H]
                    self.saved.append((y_local, r.x, r.weights))
                    y_local = y_local.detach()
                else:
                    y_local = local_experts(pend[c].wait(), *params, self.js, self.kernel)
            back.append(combine(y_local, self.ids[self.sl[c]], self.lays[c], self.sizes[c], self.group,
                                f"{where} [{c}]", async_op=True))
            if not self.overlap:
                _arrived(back[c])
        if not self.overlap:
            fill.rest()                          # baseline: nothing runs while a collective flies
        out = []
        for c in range(d):
            fill.until(back[c])                  # ... and the combine waits (the last one above all)
            _arrived(back[c])
            with span(tl, f"{where} sum[{c}]"):
                out.append(back[c].summed() if train else back[c].wait())          # [T_c, H]
        fill.rest()
        y = torch.cat(out) if d > 1 else out[0]
        ys = fill.result() if train else None
        return y if ys is None else y + ys

    def _backward(self, g: Tensor, needs: tuple) -> tuple:
        """y's gradient g [T, H] -> gradients of (x, weights, w_in, w_out, b_in, b_out) (PIPELINED_BACKWARD),
        at the backward degree bd: the d forward chunks in bd groups of d / bd consecutive chunks, each
        group's exchanges one all-to-all per direction (all_to_all_grouped: the same rows as the
        chunks' own exchanges), each chunk's expert backward on its own saved graph: the gradients
        are the same bits at every backward degree."""
        tl, where, d, bd, group = self.timeline, self.where, self.d, self.bd, self.group
        gs, m = g.split([s.stop - s.start for s in self.sl]), d // bd
        groups = [list(range(j * m, (j + 1) * m)) for j in range(bd)]
        order = range(bd - 1, -1, -1)                    # last first: autograd's order
        at = lambda j: f"{where} [{groups[j][0]}{'' if m == 1 else f'..{groups[j][-1]}'}]"  # noqa: E731
        send = lambda cs: [self.sizes[c].send for c in cs]                                 # noqa: E731
        recv = lambda cs: [self.sizes[c].recv for c in cs]                                 # noqa: E731
        cb = {j: all_to_all_grouped([gs[c][self.lays[c].token] for c in groups[j]], send(groups[j]),
                                    recv(groups[j]), group, at(j) + ": combine backward", async_op=True)
              for j in order}
        # the received pairs' gradients go back in one exchange per group: x's and the routing
        # weights' as the columns of one tensor when they share a dtype
        kinds = [k for k, need in zip("xw", needs[:2]) if need]
        packs = (([kinds] if len({self.x.dtype, self.weights.dtype}) == 1 else [[k] for k in kinds])
                 if kinds else [])                      # nothing goes back when nothing needs a gradient
        pg: list = [None] * 4
        back = {}
        fill = self.fill
        fill.backward(g)                                 # the shared expert's backward fills the waits
        for j in order:
            mine = {}
            fill.until(cb[j])
            for c, g_local in reversed(list(zip(groups[j], cb.pop(j).wait()))):
                y_local, xr, wr = self.saved[c]
                with span(tl, f"{where} experts backward[{c}]"):
                    grads = grads_by_id(y_local, (xr, wr, *self.leaves), g_local)
                add_grads(pg, self.leaves, grads)
                mine[c] = {k: grads.get(id(t)) if grads.get(id(t)) is not None else torch.zeros_like(t)
                           for k, t in zip("xw", (xr, wr)) if k in kinds}
            back[j] = [(pack, all_to_all_grouped([torch.cat([mine[c][k] for k in pack], 1) for c in groups[j]],
                                                 recv(groups[j]), send(groups[j]), group,
                                                 at(j) + ": dispatch backward", async_op=True))
                       for pack in packs]
        got: dict = {"x": [None] * d, "w": [None] * d}
        for j in order:                                  # each group's token sums while later ones fly
            for pack, pending in back[j]:
                fill.until(pending)
                widths = [self.x.shape[-1] if k == "x" else 1 for k in pack]
                for c, rows in zip(groups[j], pending.wait()):
                    for k, part in zip(pack, rows.split(widths, 1)):
                        got[k][c] = part
            with span(tl, f"{where} grads[{j}]"):
                for c in groups[j]:
                    if needs[1]:
                        got["w"][c] = weight_grad(got["w"][c], self.lays[c], self.weights[self.sl[c]].shape)
                    if needs[0]:
                        got["x"][c] = token_grad(got["x"][c], self.lays[c], self.ids[self.sl[c]])
        fill.rest()
        gx = torch.cat(got["x"]) if needs[0] else None
        gw = torch.cat(got["w"]) if needs[1] else None
        gx_shared, g_shared = fill.grads()
        if gx_shared is not None:
            gx = gx_shared if gx is None else gx + gx_shared
        return (gx, gw, *pg, *g_shared)


class _Pipelined(torch.autograd.Function):
    """A chunked layer call's routed experts as one autograd node (PIPELINED_BACKWARD)."""

    @staticmethod
    def forward(ctx, flight, x, weights, w_in, w_out, b_in, b_out, *shared):
        ctx.flight = flight
        return flight._schedule(train=True)

    @staticmethod
    def backward(ctx, g):
        return (None, *ctx.flight._backward(g.contiguous(), ctx.needs_input_grad[1:]))


def issue(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec | str,
          placement: LayerPlacement, group=None, degree: int = 1, overlap: bool = True,
          b_in=None, b_out=None, shared=None, tokens: np.ndarray | None = None, layer: int = 0,
          kernel: str = "reference", timeline=None, backward_degree: int | None = None) -> LayerInFlight:
    """moe_layer up to its dispatches in flight (plan, split sizes, d dispatches issued)."""
    import torch.distributed as dist

    rank, T = dist.get_rank(group), x.shape[0]
    where = f"layer {placement.name}"
    bd = backward_degree_for(degree if overlap else 1, backward_degree, where, group)
    js = spec if isinstance(spec, str) else spec.to_json()
    if isinstance(spec, str):
        from moecc.ops import parse_spec
        spec = parse_spec(spec)
    if tokens is None:
        tokens = token_numbers(T, group, where)
    d = degree if overlap else 1
    bounds = chunk_bounds(T, d)
    check_world(placement, group)
    with span(timeline, f"{where} plan"):
        lays = [layout(ids[lo:hi], placement, rank, tokens[lo:hi]) for lo, hi in bounds]
        vec = size_vector(lays, placement, layer, x.shape[-1], x.dtype, bd)
    sl = [slice(lo, hi) for lo, hi in bounds]
    # chunked, the dispatch buffers (they need only the layouts) are packed while the split sizes are in
    # flight; the baseline waits for the sizes first
    table = agree(vec, group, where + ": split sizes", async_op=overlap)                   # 1 collective
    if not overlap:
        sizes = read_sizes(table, lays, placement, group)
    with span(timeline, f"{where} pack"):
        packed = [dispatch_buffer(x[s], weights[s], lay) for s, lay in zip(sl, lays)]
    if overlap:
        sizes = read_sizes(table.wait(), lays, placement, group)
    pend = [dispatch(x[s], weights[s], ids[s], lay, sz, group, f"{where} [{c}]", async_op=True, packed=buf)
            for c, (s, lay, sz, buf) in enumerate(zip(sl, lays, sizes, packed))]
    fill = Filler(x, shared, spec, shared_blocks(T, d), timeline, where)
    return LayerInFlight(d=d, bd=bd, timeline=timeline, where=where, fill=fill, pend=pend, overlap=overlap, x=x,
                         weights=weights,
                         w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out, js=js, kernel=kernel, ids=ids,
                         sl=sl, lays=lays, sizes=sizes, group=group)
