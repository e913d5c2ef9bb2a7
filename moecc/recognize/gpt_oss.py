"""GPT-OSS: GptOssMLP ⇒ moe(topk_softmax: top-k of (x W^T + b), softmax over the k in model dtype;
experts x @ gate_up_proj + b, interleaved gate/up, clamped SwiGLU (up + 1) · g σ(α g), @ down_proj + b).

    router.weight [E, H], router.bias [E], experts.gate_up_proj [E, H, 2F] (transposed, interleaved),
    gate_up_proj_bias [E, 2F], down_proj [E, F, H], down_proj_bias [E, H]; alpha, limit
    returns (y, router_scores [T, k]) like GptOssMLP.
    Numerics: `x @ gate_up_proj + bias` rounds the GEMM before the bias (spec.bias_add = "after_gemm");
    the routing weights are softmaxed in the model dtype, so the combine is "weight_in_act".
"""
from __future__ import annotations

from torch import nn

from ..errors import MoeccError
from ..spec import MoESpec, RouterSpec
from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import stacked_experts


def build(block: nn.Module, path: str) -> RecognizedMoE:
    r, experts = block.router, block.experts
    ex = stacked_experts(experts, f"{path}.experts", custom_gate=True)
    if not ex["interleaved"] or ex["b_in"] is None:
        raise MoeccError(f"{path}: expected GPT-OSS experts with interleaved gate/up and biases")
    E, R, H = ex["w_in"].shape
    spec = MoESpec(num_experts=E, hidden=H, ffn=R // 2, activation="swiglu_oai", interleaved=True,
                   expert_bias=True, bias_add="after_gemm", act_alpha=float(experts.alpha),
                   act_limit=float(experts.limit),
                   router=RouterSpec("topk_softmax", top_k=int(r.top_k), renormalize=False, fp32=False),
                   name=path).validate()
    return RecognizedMoE(spec, router_weight=r.weight, router_bias=r.bias, w_in=ex["w_in"], w_out=ex["w_out"],
                         b_in=ex["b_in"], b_out=ex["b_out"], logits_fp32=False, returns="y,scores",
                         recognizer="gpt_oss")


RECOGNIZER = Recognizer("gpt_oss", by_class_name("GptOssMLP"), build)
