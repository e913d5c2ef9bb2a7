"""The module an expert-parallel experts layer becomes on one rank (passes/expert_parallel.apply).

    EPExperts(x [T, H], ids [T, S], weights [T, S]) -> y [T, H]     moecc.distributed.ep.ep_experts
    split (passes/expert_parallel.apply):  h = EPExperts(x, ids, weights)   dispatches in flight
                                           ... the graph's independent ops (the shared expert) ...
                                           y = ep_finish(h)                 experts, combine

It holds only the experts its rank computes (replicas included), as parameters: trainable, and the
backward needs no other rank's weights. EPState is shared by a model's EP layers: the process group
and, for plans with node-local experts, each token's node carried from one layer to the next (the
rule of placement metrics: the node of most of its previous-layer choices).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .ep import ep_experts, token_numbers


class EPState:
    def __init__(self, group, carry_node: bool):
        self.group, self.carry_node = group, carry_node
        self.node: np.ndarray | None = None


class EPExperts(nn.Module):
    def __init__(self, weights: dict, spec: str, kernel: str, placement, layer: int, state: EPState):
        super().__init__()
        for name, t in weights.items():
            setattr(self, name, None if t is None else nn.Parameter(t, requires_grad=t.is_floating_point()))
        self.spec, self.kernel, self.placement, self.layer, self.state = spec, kernel, placement, layer, state
        self.split = False      # True: forward returns the layer in flight, ep_finish(h) -> y


    def forward(self, x, ids, weights):
        s = self.state
        where = f"layer {self.placement.name}"
        node = s.node if (s.carry_node and self.layer > 0 and s.node is not None
                          and len(s.node) == x.shape[0]) else None
        tokens = token_numbers(x.shape[0], s.group, where)
        degree = getattr(self, "overlap_degree", 1)          # set by passes/overlap.apply (and
                                                             # overlap_backward_degree, for training)
        if (degree > 1 or self.split) and not s.carry_node:  # chunked, all-to-alls behind compute
            from .overlap import issue
            h = issue(x, ids, weights, self.w_in, self.w_out, self.spec, self.placement, s.group,
                      degree, b_in=self.b_in, b_out=self.b_out, tokens=tokens, layer=self.layer,
                      kernel=self.kernel, backward_degree=getattr(self, "overlap_backward_degree", None))
            return h if self.split else h.finish()
        y, lay = ep_experts(x, ids, weights, self.w_in, self.w_out, self.b_in, self.b_out, self.spec,
                            self.placement, s.group, self.layer, tokens, node, self.kernel)
        if s.carry_node:
            G = self.placement.devices_per_node
            rank = torch.distributed.get_rank(s.group)
            s.node = lay.node(np.full(x.shape[0], rank // G) if node is None else node, self.placement)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.placement.name}, experts={tuple(self.w_in.shape)}"


def ep_finish(h):
    """The second node of a split EP layer: y [T, H] from EPExperts' result (a layer in flight, or
    already y where the layer cannot be split, e.g. node-local experts)."""
    return h.finish() if hasattr(h, "finish") else h
