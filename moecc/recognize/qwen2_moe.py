"""Qwen2-MoE: Qwen2MoeSparseMoeBlock ⇒ moe(softmax fp32 → top-k (→ renormalize if norm_topk_prob),
SwiGLU experts, + sigmoid(shared_expert_gate(x)) · shared_expert(x)).

    gate.weight [E, H], experts.gate_up_proj [E, 2F, H], shared_expert.{gate,up,down}_proj, shared_expert_gate [1, H]
"""
from __future__ import annotations

from torch import nn

from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import softmax_topk_block


def build(block: nn.Module, path: str) -> RecognizedMoE:
    return softmax_topk_block(block, path, "qwen2_moe", renormalize=bool(block.gate.norm_topk_prob),
                              shared=block.shared_expert, shared_gate=block.shared_expert_gate)


RECOGNIZER = Recognizer("qwen2_moe", by_class_name("Qwen2MoeSparseMoeBlock"), build)
