"""DeepSeek-V3: DeepseekV3MoE ⇒ moe(sigmoid_topk: σ(logits fp32), e_score_correction_bias chooses,
group-limited top-k (top-2-sum group score, dropped groups masked to -inf as transformers 5.x does),
renormalize if norm_topk_prob, × routed_scaling_factor; SwiGLU experts + ungated shared experts).

    gate.weight [E, H] (x and weight upcast to fp32), gate.e_score_correction_bias [E],
    experts.gate_up_proj [E, 2F, H], shared_experts.{gate,up,down}_proj (width F · n_shared_experts)
    The first `first_k_dense_replace` layers are DeepseekV3MLP (dense) and stay as they are.
    combine: the fp32 (scaled) routing weights multiply each expert's output in fp32, rounded to the
    model dtype before the index_add_ (spec.combine = "weight_fp32"); the shared experts are added after.
"""
from __future__ import annotations

from torch import nn

from ..spec import MoESpec, RouterSpec
from .base import Recognizer, by_class_name
from .block import RecognizedMoE
from .hf import gated_mlp, stacked_experts


def build(block: nn.Module, path: str) -> RecognizedMoE:
    gate = block.gate
    ex = stacked_experts(block.experts, f"{path}.experts")
    E, R, H = ex["w_in"].shape
    sw_in, sw_out, shared_ffn = gated_mlp(block.shared_experts)
    router = RouterSpec("sigmoid_topk", top_k=int(gate.top_k), renormalize=bool(gate.norm_topk_prob),
                        scaling=float(gate.routed_scaling_factor), n_groups=int(gate.num_group),
                        topk_groups=int(gate.topk_group), group_score="top2_sum", fp32=True)
    spec = MoESpec(num_experts=E, hidden=H, ffn=R // 2, activation=ex["activation"], router=router,
                   shared_ffn=shared_ffn, combine="weight_fp32", name=path).validate()
    return RecognizedMoE(spec, router_weight=gate.weight, w_in=ex["w_in"], w_out=ex["w_out"],
                         correction_bias=gate.e_score_correction_bias, shared_w_in=sw_in,
                         shared_w_out=sw_out, logits_fp32=True, recognizer="deepseek_v3")


RECOGNIZER = Recognizer("deepseek_v3", by_class_name("DeepseekV3MoE"), build)
