"""Router math: ONE reference per router family, shared by the op, the nn module and the tests.

    route(logits [T, L], spec) -> (weights [T, S], ids [T, S])

S = k for token-choice routers, S = E for expert choice. A slot whose token was dropped (capacity) or
not picked (expert choice) has id -1 and weight 0. Logits come from a Linear outside the op
(L = E, or G + E for hierarchical routing: group logits first).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import MoeccError
from .spec import MoESpec


def route(logits: Tensor, spec: MoESpec, correction_bias: Tensor | None = None,
          token_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r = spec.router
    logits = logits.float() if r.fp32 else logits
    if r.kind == "softmax_topk":
        weights, ids = _softmax_topk(logits, r.top_k, r.renormalize)
    elif r.kind == "topk_softmax":
        top, ids = torch.topk(logits, r.top_k, dim=-1)                  # [T, k]
        weights = torch.softmax(top, dim=-1)
    elif r.kind == "sigmoid_topk":
        weights, ids = _sigmoid_topk(logits, spec, correction_bias)
    elif r.kind == "hierarchical":
        weights, ids = _hierarchical(logits, spec)
    elif r.kind == "expert_choice":
        return _expert_choice(logits, spec)
    elif r.kind == "hash":
        weights, ids = _hash(logits, spec, token_ids)
    else:
        raise MoeccError(f"MoE layer {spec.name or '?'}: unknown router kind {r.kind!r}")
    if r.scaling != 1.0:
        weights = weights * r.scaling
    if r.capacity_factor is not None:
        weights, ids = apply_capacity(weights, ids, spec)
    return weights, ids


def _softmax_topk(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits, dim=-1)                                 # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)                          # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _sigmoid_topk(logits: Tensor, spec: MoESpec, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: sigmoid scores, bias only for choosing, group-limited top-k, renormalize."""
    r, E = spec.router, spec.num_experts
    scores = torch.sigmoid(logits)                                        # [T, E]
    choice = scores + bias.to(scores.dtype) if bias is not None else scores
    if r.n_groups > 1:
        grouped = choice.view(-1, r.n_groups, E // r.n_groups)            # [T, G, E/G]
        if r.group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)         # [T, G]
        group_ids = torch.topk(group_scores, r.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, E)
        choice = choice.masked_fill(expert_mask == 0, 0.0)
    ids = torch.topk(choice, r.top_k, dim=-1, sorted=False)[1]           # [T, k]
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def _hierarchical(logits: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    """p(e) = softmax(group logits)[g(e)] * softmax(expert logits within g(e)); top groups, then top-k."""
    r, E, G = spec.router, spec.num_experts, spec.router.n_groups
    if logits.shape[-1] != G + E:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hierarchical routing needs G+E={G + E} "
                         f"logits (groups first), got {logits.shape[-1]}")
    group_p = torch.softmax(logits[:, :G], dim=-1)                        # [T, G]
    inner = torch.softmax(logits[:, G:].reshape(-1, G, E // G), dim=-1)   # [T, G, E/G]
    group_ids = torch.topk(group_p, r.topk_groups, dim=-1)[1]
    keep = torch.zeros_like(group_p).scatter_(1, group_ids, 1.0)
    probs = (group_p * keep).unsqueeze(-1) * inner                         # [T, G, E/G]
    weights, ids = torch.topk(probs.reshape(-1, E), r.top_k, dim=-1)
    if r.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_choice_capacity(tokens: int, spec: MoESpec) -> int:
    cf = spec.router.capacity_factor or float(spec.top_k)
    return max(1, min(tokens, math.ceil(cf * tokens / spec.num_experts)))


def _expert_choice(logits: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    """Each expert takes its top-C tokens by softmax score (Zhou et al. 2022). Batch-dependent."""
    T, E = logits.shape[0], spec.num_experts
    probs = torch.softmax(logits, dim=-1)                                 # [T, E]
    cap = expert_choice_capacity(T, spec)
    top, tok = torch.topk(probs.t(), cap, dim=-1)                         # [E, C]
    picked = torch.zeros_like(probs).scatter_(0, tok.t(), 1.0)            # [C, E] -> [T, E] mask
    weights = probs * picked * spec.router.scaling
    ids = torch.arange(E, device=logits.device).expand(T, E)
    return weights, torch.where(picked > 0, ids, -1)


HASH_MULT = 2654435761  # Knuth's multiplicative hash


def hash_experts(token_ids: Tensor, num_experts: int, k: int) -> Tensor:
    """token id -> k distinct experts: ((id * HASH_MULT) mod 2^31 + j) mod E, j = 0..k-1."""
    base = (token_ids.long() * HASH_MULT) % (2 ** 31)                      # [T]
    return (base.unsqueeze(-1) + torch.arange(k, device=token_ids.device)) % num_experts


def _hash(logits: Tensor, spec: MoESpec, token_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    if token_ids is None:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hash routing needs token ids, but the layer "
                         f"has none (the model's input has no token ids reaching this layer)")
    ids = hash_experts(token_ids.reshape(-1), spec.num_experts, spec.top_k)
    weights = torch.full(ids.shape, 1.0 / spec.top_k, dtype=logits.dtype, device=logits.device)
    return weights, ids


def token_capacity(tokens: int, spec: MoESpec) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E)."""
    return max(1, math.ceil(spec.router.capacity_factor * tokens * spec.top_k / spec.num_experts))


def apply_capacity(weights: Tensor, ids: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    """Drop assignments past each expert's capacity; priority: slot 0 of every token, then slot 1, ..."""
    T, k = ids.shape
    cap = token_capacity(T, spec)
    flat = ids.t().reshape(-1)                                            # [k*T] slot-major
    onehot = torch.nn.functional.one_hot(flat, spec.num_experts)          # [k*T, E]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1                    # [k*T] position in expert queue
    keep = (position < cap).reshape(k, T).t()                             # [T, k]
    return weights * keep, torch.where(keep, ids, -1)


def dropped_fraction(ids: Tensor) -> float:
    """Fraction of routed (token, slot) assignments dropped by capacity."""
    return float((ids < 0).float().mean()) if ids.numel() else 0.0
