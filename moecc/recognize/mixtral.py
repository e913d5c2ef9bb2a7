"""Mixtral: MixtralSparseMoeBlock ⇒ moe(softmax fp32 → top-k → renormalize, SwiGLU experts).

    gate.weight [E, H] (logits in model dtype), experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]
"""
from __future__ import annotations

from torch import nn

from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import refuse_training_noise, softmax_topk_block


def build(block: nn.Module, path: str) -> RecognizedMoE:
    refuse_training_noise(block, block.jitter_noise, path)
    return softmax_topk_block(block, path, "mixtral", renormalize=True)   # Mixtral always renormalizes


RECOGNIZER = Recognizer("mixtral", by_class_name("MixtralSparseMoeBlock"), build)
