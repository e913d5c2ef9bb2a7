"""Switch Transformers: SwitchTransformersSparseMLP ⇒ moe(softmax (router_dtype) → top-1, weight = the
top probability, fixed expert_capacity counted per sequence (token order), ReLU experts).

    router.classifier.weight [E, H] (+ bias), experts = ModuleDict{expert_i: wi [F, H], wo [H, F]}
        ⇒ w_in = stack(wi) [E, F, H], w_out = stack(wo) [E, H, F]
    Tokens past an expert's capacity in their sequence get no expert (output 0; the residual carries them).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MoeccError
from ..spec import MoESpec, RouterSpec
from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import activation, refuse_training_noise


def build(block: nn.Module, path: str) -> RecognizedMoE:
    router = block.router
    refuse_training_noise(block, float(router.jitter_noise), path)
    experts = [block.experts[f"expert_{i}"] for i in range(router.num_experts)]
    w_in = torch.stack([e.wi.weight for e in experts])                   # [E, F, H]
    w_out = torch.stack([e.wo.weight for e in experts])                  # [E, H, F]
    model_dtype = w_in.dtype
    if router.dtype not in (torch.float32, model_dtype):
        raise MoeccError(f"{path}: router_dtype {router.dtype} is neither fp32 nor the model's {model_dtype}")
    fp32 = router.dtype == torch.float32
    E, F, H = w_in.shape
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation=activation(experts[0].act, path, gated=False),
                   router=RouterSpec("softmax_topk", top_k=1, renormalize=False, fp32=fp32,
                                     capacity=int(router.expert_capacity), capacity_per_row=True),
                   name=path).validate()
    cls = router.classifier
    return RecognizedMoE(spec, router_weight=cls.weight, router_bias=cls.bias, w_in=w_in, w_out=w_out,
                         logits_fp32=fp32, recognizer="switch")


RECOGNIZER = Recognizer("switch", by_class_name("SwitchTransformersSparseMLP"), build)
