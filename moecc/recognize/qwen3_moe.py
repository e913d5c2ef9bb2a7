"""Qwen3-MoE: Qwen3MoeSparseMoeBlock ⇒ moe(softmax fp32 → top-k (→ renormalize if norm_topk_prob), SwiGLU).

    gate.weight [E, H], experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]; no shared expert.
    Dense layers (mlp_only_layers, decoder_sparse_step) are Qwen3MoeMLP and stay as they are.
"""
from __future__ import annotations

from torch import nn

from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import softmax_topk_block


def build(block: nn.Module, path: str) -> RecognizedMoE:
    return softmax_topk_block(block, path, "qwen3_moe", renormalize=bool(block.gate.norm_topk_prob))


RECOGNIZER = Recognizer("qwen3_moe", by_class_name("Qwen3MoeSparseMoeBlock"), build)
