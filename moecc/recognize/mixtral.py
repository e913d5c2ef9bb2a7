"""Mixtral: MixtralSparseMoeBlock ⇒ moe(softmax fp32 → top-k → renormalize, SwiGLU experts).

    gate.weight [E, H] (logits in model dtype), experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]
    combine: the fp32 routing weights multiply each expert's output in fp32, rounded to the model dtype
    before the index_add_ (spec.combine = "weight_fp32").
"""
from __future__ import annotations

from torch import nn

from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import refuse_training_noise, softmax_topk_block


def build(block: nn.Module, path: str) -> RecognizedMoE:
    refuse_training_noise(block, block.jitter_noise, path)
    # Mixtral always renormalizes; its router keeps the weights in fp32: expert output × weight in fp32
    return softmax_topk_block(block, path, "mixtral", renormalize=True, combine="weight_fp32")


RECOGNIZER = Recognizer("mixtral", by_class_name("MixtralSparseMoeBlock"), build)
