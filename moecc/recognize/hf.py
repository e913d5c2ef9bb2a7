"""Readers shared by the Hugging Face transformers 5.x recognizers (transformers is never imported).

    experts.gate_up_proj [E, 2F, H] ([gate; up]) | [E, H, 2F] (is_transposed) , experts.down_proj
        ⇒ w_in [E, 2F, H], w_out [E, H, F] (+ b_in, b_out when has_bias; interleaved when not is_concatenated)
    gate.weight [E, H], softmax in fp32 → top-k (→ renormalize)  ⇒  RouterSpec("softmax_topk", fp32=True)

The `@use_experts_implementation` switch (eager / batched_mm / grouped_mm) only changes how HF runs the
experts, never what they compute, so one reader covers all of them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import MoeccError
from ..spec import GATED, MoESpec, RouterSpec
from .block import RecognizedMoE

_ACT = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu",
        "GELUTanh": "gelu_tanh", "ReLU": "relu"}
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def activation(act_fn: nn.Module, path: str, gated: bool) -> str:
    """HF activation module -> MoESpec activation (gated: act(gate) * up)."""
    name = _ACT.get(type(act_fn).__name__)
    if name == "gelu" and getattr(act_fn, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    if name is None or (gated and name not in _GATED):
        raise MoeccError(f"{path}: expert activation {type(act_fn).__name__}{' (gated)' if gated else ''} "
                         f"has no MoESpec activation")
    return _GATED[name] if gated else name


def refuse_training_noise(block: nn.Module, noise: float, path: str) -> None:
    if block.training and noise > 0:
        raise MoeccError(f"{path}: router jitter noise {noise} is active in training mode; call "
                         f"model.eval() before capture")


def stacked_experts(ex: nn.Module, path: str, custom_gate: bool = False) -> dict:
    """The tensors and layout flags of an HF stacked-experts module (nn.Linear layout out)."""
    if getattr(ex, "has_post_expert_norm", False):
        raise MoeccError(f"{path}: experts apply a post-expert norm, which MoESpec cannot express")
    gated = getattr(ex, "has_gate", True)
    gate_fn = getattr(type(ex), "_apply_gate", None)
    if gated and not custom_gate and getattr(gate_fn, "__name__", "_default_apply_gate") != "_default_apply_gate":
        raise MoeccError(f"{path}: {type(ex).__name__} overrides _apply_gate; no recognizer knows this gate")
    w_in, w_out = (ex.gate_up_proj if gated else ex.up_proj), ex.down_proj
    if getattr(ex, "is_transposed", False):
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)                   # -> [E, R, H], [E, H, F]
    bias = getattr(ex, "has_bias", False)
    out = {"w_in": w_in, "w_out": w_out,
           "b_in": (ex.gate_up_proj_bias if gated else ex.up_proj_bias) if bias else None,
           "b_out": ex.down_proj_bias if bias else None,
           "interleaved": not getattr(ex, "is_concatenated", True)}
    if not custom_gate:
        out["activation"] = activation(ex.act_fn, path, gated)
    return out


def gated_mlp(mlp: nn.Module | None) -> tuple[Tensor | None, Tensor | None, int]:
    """HF gate_proj/up_proj/down_proj MLP -> (w_in [2F, H] = [gate; up], w_out [H, F], F); F=0: none."""
    if mlp is None or mlp.gate_proj.out_features == 0:
        return None, None, 0
    w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
    return w_in, mlp.down_proj.weight, mlp.gate_proj.out_features


def softmax_topk_block(block: nn.Module, path: str, family: str, renormalize: bool,
                       shared: nn.Module | None = None, shared_gate: nn.Linear | None = None,
                       combine: str = "weight_in_act") -> RecognizedMoE:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: logits in model dtype, softmax fp32, top-k.
    combine: Mixtral's router returns its fp32 weights ("weight_fp32"); the Qwen-MoE and OLMoE routers
    cast them to the logits' dtype first ("weight_in_act")."""
    ex = stacked_experts(block.experts, f"{path}.experts")
    E, R, H = ex["w_in"].shape
    sw_in, sw_out, shared_ffn = gated_mlp(shared)
    spec = MoESpec(num_experts=E, hidden=H, ffn=R // 2 if ex["activation"] in GATED else R,
                   activation=ex["activation"], interleaved=ex["interleaved"], expert_bias=ex["b_in"] is not None,
                   router=RouterSpec("softmax_topk", top_k=int(block.gate.top_k), renormalize=renormalize, fp32=True),
                   shared_ffn=shared_ffn, shared_gated=shared_ffn > 0 and shared_gate is not None,
                   combine=combine, name=path).validate()
    if shared_ffn and activation(shared.act_fn, f"{path}.shared_expert", gated=True) != spec.activation:
        raise MoeccError(f"{path}: shared expert activation differs from the routed experts'")
    return RecognizedMoE(spec, router_weight=block.gate.weight, w_in=ex["w_in"], w_out=ex["w_out"],
                         b_in=ex["b_in"], b_out=ex["b_out"], shared_w_in=sw_in, shared_w_out=sw_out,
                         shared_gate=shared_gate.weight if spec.shared_gated else None,
                         logits_fp32=False, recognizer=family)
