"""Random MoE layers for the property tests of every backend: a hypothesis strategy over MoESpec
(E, k, F, router kind and options, activation, biases, shared expert, capacity), layers with weights at
a scale where routing and numerics matter, and many layers side by side in one model (one export and
one compile cover them all)."""
from __future__ import annotations

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

from moecc.errors import MoeccError
from moecc.nn import MoE
from moecc.routing import check
from moecc.spec import ACTIVATIONS, ROUTER_KINDS, MoESpec, RouterSpec


@st.composite
def layers(draw, name: str, H: int = 8) -> MoESpec:
    E = draw(st.sampled_from([2, 4, 6, 8]))
    kind = draw(st.sampled_from(sorted(ROUTER_KINDS)))
    grouped = kind == "hierarchical" or (kind in ("softmax_topk", "sigmoid_topk") and draw(st.booleans()))
    G = draw(st.sampled_from([g for g in (2, 4) if E % g == 0 and g < E] or [1])) if grouped else 1
    router = RouterSpec(
        kind=kind, top_k=draw(st.integers(1, min(E, 3))), renormalize=draw(st.booleans()),
        scaling=draw(st.sampled_from([1.0, 2.5])), n_groups=G, topk_groups=draw(st.integers(1, G)),
        group_score=draw(st.sampled_from(["top2_sum", "max"])),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.25])))
    act = draw(st.sampled_from(ACTIVATIONS))
    shared = draw(st.sampled_from([0, 0, 3]))
    spec = MoESpec(E, H, draw(st.integers(2, 7)), act, router, expert_bias=draw(st.booleans()),
                   interleaved=draw(st.booleans()), act_limit=0.9, shared_ffn=shared,
                   shared_gated=bool(shared) and draw(st.booleans()), name=name)
    try:
        check(spec)
    except MoeccError:
        assume(False)
    return spec


def randomized(layer: MoE, seed: int) -> MoE:
    """Every parameter O(1)-ish (logits ~1, outputs ~1), so a wrong route or weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 0.3 if name.startswith("correction") else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return layer.eval()


class Side(nn.Module):
    """Independent MoE layers on the same input; returns every layer's output."""

    def __init__(self, specs: list[MoESpec], seed: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(randomized(MoE(s), seed + i) for i, s in enumerate(specs))

    def forward(self, x, token_ids):
        return tuple(layer(x, token_ids) for layer in self.layers)
