"""OLMoE: OlmoeSparseMoeBlock ⇒ moe(softmax fp32 → top-k (→ renormalize if norm_topk_prob), SwiGLU).

    gate.weight [E, H], experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]
"""
from __future__ import annotations

from torch import nn

from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import softmax_topk_block


def build(block: nn.Module, path: str) -> RecognizedMoE:
    return softmax_topk_block(block, path, "olmoe", renormalize=bool(block.gate.norm_topk_prob))


RECOGNIZER = Recognizer("olmoe", by_class_name("OlmoeSparseMoeBlock"), build)
