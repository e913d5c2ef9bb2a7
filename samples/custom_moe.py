"""Your own MoE block, captured by moecc without editing moecc: register a recognizer at call time.

    MOEFeedForward (gpt-fast style: gate Linear, softmax → top-k → renormalize, stacked w1/w3/w2)
        ⇒ registered declaratively: MoEMapping(parameter paths, router, activation)
    ListMoE (router Linear, nn.ModuleList of GELU experts with biases)
        ⇒ registered with a hand-written Recognizer(build) returning a RecognizedMoE

    model, inputs = build_raw()                       # plain PyTorch, moecc knows neither block
    model, report = recognize(model, recognizers())   # built-ins + yours; yours win
    build_custom()                                    # the same, ready for `moecc compile samples/custom_moe.py:build_custom`
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecc.recognize import MoEMapping, RecognizedMoE, Recognizer, by_class_name, recognize
from moecc.spec import MoESpec, RouterSpec


class ConditionalFeedForward(nn.Module):
    def __init__(self, E: int, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, ffn, dim) / dim ** 0.5)    # gate  [E, F, D]
        self.w2 = nn.Parameter(torch.randn(E, dim, ffn) / ffn ** 0.5)    # down  [E, D, F]
        self.w3 = nn.Parameter(torch.randn(E, ffn, dim) / dim ** 0.5)    # up    [E, F, D]

    def forward(self, x: Tensor, expert_indices: Tensor) -> Tensor:
        w1, w3, w2 = self.w1[expert_indices], self.w3[expert_indices], self.w2[expert_indices]  # [T, A, ., .]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1))                # [T, A, F]
        x3 = torch.einsum("ti,taoi -> tao", x, w3)
        return torch.einsum("tao,taio -> tai", x1 * x3, w2)               # [T, A, D]


class MOEFeedForward(nn.Module):
    def __init__(self, E: int = 8, k: int = 2, dim: int = 64, ffn: int = 96):
        super().__init__()
        self.gate = nn.Linear(dim, E, bias=False)
        self.cond_ffn = ConditionalFeedForward(E, dim, ffn)
        self.dim, self.num_activated_experts = dim, k

    def forward(self, x: Tensor) -> Tensor:
        shape, x = x.shape, x.view(-1, self.dim)                          # [T, D]
        expert_weights = F.softmax(self.gate(x), dim=-1)                  # [T, E]
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)   # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)                    # [T, A, D]
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights).view(shape)


class ListMoE(nn.Module):
    """router → softmax → top-k (no renormalization); experts: Linear+bias → GELU → Linear+bias."""

    def __init__(self, E: int = 4, k: int = 2, dim: int = 64, ffn: int = 64):
        super().__init__()
        self.router, self.k = nn.Linear(dim, E, bias=False), k
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
                                     for _ in range(E))

    def forward(self, x: Tensor) -> Tensor:
        probs = F.softmax(self.router(x), dim=-1)                          # [..., E]
        w, ids = torch.topk(probs, self.k, dim=-1)                         # [..., k]
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + expert(x) * (w * (ids == e)).sum(-1, keepdim=True)
        return y


# --- the registration: data for MOEFeedForward, code for ListMoE ---------------------------------

MOE_FEED_FORWARD = MoEMapping(
    module="MOEFeedForward", router_weight="gate.weight", w_in=("cond_ffn.w1", "cond_ffn.w3"),
    w_out="cond_ffn.w2", activation="swiglu", top_k_attr="num_activated_experts",
    router=RouterSpec("softmax_topk", renormalize=True, fp32=False))   # gpt-fast's softmax runs in model dtype


def build_list_moe(block: ListMoE, path: str) -> RecognizedMoE:
    fc1 = [e[0] for e in block.experts]
    fc2 = [e[2] for e in block.experts]
    E, (F_, H) = len(fc1), fc1[0].weight.shape
    spec = MoESpec(num_experts=E, hidden=H, ffn=F_, activation="gelu", expert_bias=True, name=path,
                   router=RouterSpec("softmax_topk", top_k=block.k, renormalize=False, fp32=False))
    return RecognizedMoE(spec, router_weight=block.router.weight,
                         w_in=torch.stack([l.weight for l in fc1]), b_in=torch.stack([l.bias for l in fc1]),
                         w_out=torch.stack([l.weight for l in fc2]), b_out=torch.stack([l.bias for l in fc2]),
                         recognizer="list_moe")


LIST_MOE = Recognizer("list_moe", by_class_name("ListMoE"), build_list_moe)


def recognizers() -> list:
    return [MOE_FEED_FORWARD, LIST_MOE]


# --- a tiny LM using both blocks -------------------------------------------------------------------

class TinyMoELM(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(3))
        self.blocks = nn.ModuleList([MOEFeedForward(dim=dim), ListMoE(dim=dim)])
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)                                          # [B, S, D]
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.norms[-1](h))                                # [B, S, V]


def build_raw(seed: int = 0, batch: int = 2, seq: int = 8):
    torch.manual_seed(seed)
    model = TinyMoELM().eval()
    return model, (torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed + 1)),)


def build_custom(seed: int = 0, batch: int = 2, seq: int = 8):
    model, inputs = build_raw(seed, batch, seq)
    model, _ = recognize(model, recognizers())
    return model, inputs
