"""Compute independent of the exchanged tokens (the shared expert, in fixed row blocks), run a block
at a time while a collective the chunked layer must wait for is still in flight
(moecc.distributed.overlap):

    fill = Filler(x, shared, spec, blocks, timeline, where)
    fill.until(handle)     blocks while `handle` has not arrived (greedy: the earliest wait left)
    fill.rest()            the blocks left
    fill.result()          the shared expert's output [T, H] (None without one)

Training through the pipelined backward (overlap.PIPELINED_BACKWARD): `record()` before the forward
computes each block on leaf copies (a row block of x, the shared weights), so the backward can run it
block by block too: `backward(g)` switches until / rest to the blocks' backward (last block first,
autograd's order: the shared weights' gradients sum in the same order as autograd's); `grads()` ->
(x's gradient from the shared expert [T, H] or None, the shared weights' gradients).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from moecc.ops import shared_expert


def span(timeline, name: str):
    return timeline.span("compute", name) if timeline is not None else nullcontext()


def grads_by_id(out, tensors, g) -> dict:
    """out's gradients (upstream g) w.r.t. those of `tensors` that require one -> {id(tensor): grad
    or None}; {} when none does (autograd.grad refuses an empty list)."""
    inputs = [t for t in tensors if t is not None and t.requires_grad]
    if not inputs:
        return {}
    return dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, g, allow_unused=True)))


def add_grads(acc: list, leaves, got: dict) -> None:
    """acc[i] += got's gradient of leaves[i], where it has one (calls in a fixed order: the sum's order)."""
    for i, t in enumerate(leaves):
        gi = got.get(id(t)) if t is not None else None
        if gi is not None:
            acc[i] = gi if acc[i] is None else acc[i] + gi


class Filler:
    def __init__(self, x, shared, spec, blocks, timeline, where):
        self.x, self.shared, self.spec, self.timeline, self.where = x, shared, spec, timeline, where
        self.todo = list(range(len(blocks))) if shared is not None else []
        self.blocks, self.out, self.inputs = blocks, {}, None       # inputs: {block: x leaf} (record)
        self._step = self._forward

    def record(self) -> None:
        """Compute the blocks on leaves (for backward()); the shared weights as given stay the
        pipelined node's inputs."""
        if self.shared is None:
            return
        self.inputs = {}
        self.leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in self.shared)

    def _forward(self) -> None:
        i = self.todo.pop(0)
        lo, hi = self.blocks[i]
        xb, weights = self.x[lo:hi], self.shared
        if self.inputs is not None:
            xb, weights = xb.detach().requires_grad_(self.x.requires_grad), self.leaves
            self.inputs[i] = xb
        with span(self.timeline, f"{self.where} shared[{i}]"), torch.set_grad_enabled(
                self.inputs is not None or torch.is_grad_enabled()):
            self.out[i] = shared_expert(xb, *weights, self.spec)                          # [rows, H]

    def backward(self, g) -> None:
        """From now on until / rest run the blocks' backward with y's gradient g [T, H]."""
        self.g, self.gx, self.gw = g, {}, [None] * len(self.leaves if self.inputs is not None else ())
        self.todo = sorted(self.out, reverse=True) if self.inputs is not None else []
        self._step = self._backward

    def _backward(self) -> None:
        i = self.todo.pop(0)
        lo, hi = self.blocks[i]
        with span(self.timeline, f"{self.where} shared backward[{i}]"):
            got = grads_by_id(self.out[i], (self.inputs[i], *self.leaves), self.g[lo:hi])
        self.gx[i] = got.get(id(self.inputs[i]))
        add_grads(self.gw, self.leaves, got)

    def until(self, handle) -> None:
        while self.todo and not handle.done():
            self._step()

    def rest(self) -> None:
        while self.todo:
            self._step()

    def result(self):
        return torch.cat([self.out[i] for i in range(len(self.blocks))]) if self.out else None

    def grads(self):
        """After backward and rest: (x's gradient [T, H] or None, [the shared weights' gradients])."""
        gx = None
        if self.gx and all(self.gx.get(i) is not None for i in range(len(self.blocks))):
            gx = torch.cat([self.gx[i] for i in range(len(self.blocks))])
        return gx, self.gw
