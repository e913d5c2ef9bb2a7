"""A tiny BERT-style encoder: the GELU FFN is split across two modules, as in Hugging Face BERT.

    layer: attention → Intermediate(dense + gelu) → Output(dense + dropout + LayerNorm(· + residual))

The upcycle pass must find `intermediate.dense → gelu → output.dense` across the module boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, mask):                                      # x [B, S, D], mask [B, S]
        B, S, D = x.shape
        split = lambda t: t.view(B, S, self.heads, D // self.heads).transpose(1, 2)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)), attn_mask=bias)
        return self.norm(x + self.out(y.transpose(1, 2).reshape(B, S, D)))


class Intermediate(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(dim, ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(ffn, dim)
        self.dropout = nn.Dropout(0.1)
        self.LayerNorm = nn.LayerNorm(dim)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.intermediate = Intermediate(dim, ffn)
        self.output = Output(dim, ffn)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 64, layers: int = 3, heads: int = 4, ffn: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(128, dim)
        self.norm = nn.LayerNorm(dim)
        self.layer = nn.ModuleList(Layer(dim, heads, ffn) for _ in range(layers))

    def forward(self, input_ids, attention_mask):                   # [B, S] each
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.embed(input_ids) + self.pos(pos))
        for layer in self.layer:
            x = layer(x, attention_mask)
        return x                                                     # [B, S, D]


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = TinyBert(**kw).eval()
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    return model, (ids, mask)
