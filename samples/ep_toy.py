"""A small MoE language-model block stack written at the experts level, as the op-family
decomposition produces it: router Linear → moecc.routing.route (ATen ops) → torch.ops.moecc.experts
→ + shared expert. Used by the expert-parallel pass, its tests and the README's launch example:

    moecc compile samples/ep_toy.py:build --ep 2 --to torch --out out/ep_toy
    torchrun --nproc-per-node 2 -m moecc.distributed.launch out/ep_toy --input in.npz --output y.npz
"""
from __future__ import annotations

import torch
from torch import nn

from moecc.ops import call_experts, shared_expert
from moecc.routing import route
from moecc.spec import MoESpec, RouterSpec


class ExpertsBlock(nn.Module):
    def __init__(self, name: str, hidden=16, ffn=12, experts=8, top_k=2, shared=8,
                 router: RouterSpec | None = None):
        super().__init__()
        self.spec = MoESpec(num_experts=experts, hidden=hidden, ffn=ffn, activation="swiglu",
                            router=router or RouterSpec(top_k=top_k), shared_ffn=shared, name=name)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / hidden ** 0.5)   # [E, 2F, H]
        self.w_out = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn ** 0.5)          # [E, H, F]
        self.s_in = nn.Parameter(torch.randn(2 * shared, hidden) / hidden ** 0.5)
        self.s_out = nn.Parameter(torch.randn(hidden, shared) / shared ** 0.5)

    def forward(self, x):                                                  # [B, S, H]
        xt = x.reshape(-1, x.shape[-1])                                    # [T, H]
        weights, ids = route(self.router(xt), self.spec)                   # [T, k]
        y = call_experts(xt, ids, weights, self.w_in, self.w_out, self.spec)
        y = y + shared_expert(xt, self.s_in, self.s_out, None, self.spec)
        return x + y.reshape(x.shape)


class EPToy(nn.Module):
    def __init__(self, vocab=64, hidden=16, layers=2, **kw):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(ExpertsBlock(f"blocks.{i}.moe", hidden, **kw) for i in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):                                             # [B, S]
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = EPToy(**kw).eval()
    return model, (torch.randint(0, 64, (4, 8)),)
