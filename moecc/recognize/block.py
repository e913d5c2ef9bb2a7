"""The module a recognized MoE block becomes: `moecc.nn.MoE` holding the block's exact weights.

    block(x [..., H]) -> y [..., H]   (or the tuple the block returned, e.g. (y, router scores))
      ⇒ RecognizedMoE: logits = router(x) in the block's precision; y = torch.ops.moecc.moe(x, logits, ...)

The router Linear stays an ordinary graph node in front of the op, so its precision (fp32 logits or
model-dtype logits) is visible in the graph; `spec.router.fp32` says whether the softmax/sigmoid runs
in fp32. Weights are taken as they are (no copy when the layout already matches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MoeccError
from ..nn import MoE
from ..routing import route
from ..spec import MoESpec

RETURNS = ("y", "y,scores", "y,logits")   # what the block's forward returned


class RecognizedMoE(MoE):
    """moecc.nn.MoE built from a recognized block's weights (nn.Linear layouts, see MoESpec)."""

    def __init__(self, spec: MoESpec, *, router_weight: Tensor, w_in: Tensor, w_out: Tensor,
                 router_bias: Tensor | None = None, b_in: Tensor | None = None, b_out: Tensor | None = None,
                 correction_bias: Tensor | None = None, shared_w_in: Tensor | None = None,
                 shared_w_out: Tensor | None = None, shared_gate: Tensor | None = None,
                 logits_fp32: bool = False, returns: str = "y", recognizer: str = ""):
        if returns not in RETURNS:
            raise MoeccError(f"MoE layer {spec.name or '?'}: returns={returns!r} must be one of {RETURNS}")
        with torch.device("meta"):   # shapes only; the real tensors are the block's
            super().__init__(spec, router_bias=router_bias is not None)
        given = {"router.weight": router_weight, "router.bias": router_bias, "w_in": w_in, "w_out": w_out,
                 "b_in": b_in, "b_out": b_out, "correction_bias": correction_bias,
                 "shared_w_in": shared_w_in, "shared_w_out": shared_w_out, "shared_gate": shared_gate}
        for name, tensor in given.items():
            _load(self, name, tensor, spec)
        _materialize(self, w_in.device)
        self.logits_fp32 = logits_fp32
        self.returns = returns
        self.recognizer = recognizer

    def router_logits(self, x: Tensor) -> Tensor:
        """[..., H] -> [..., E]: in fp32 (x and weight upcast) or in the model's dtype, as the block did."""
        if self.logits_fp32:
            b = None if self.router.bias is None else self.router.bias.float()
            return F.linear(x.float(), self.router.weight.float(), b)
        return self.router(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        y = super().forward(x)
        if self.returns == "y":
            return y
        logits = self.router_logits(x).reshape(-1, self.router.out_features)     # [T, E]
        if self.returns == "y,logits":
            return y, logits
        weights, _ = route(logits, self.spec, self.correction_bias)             # [T, k]
        return y, weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, from={self.recognizer or '?'}"


def _load(module: nn.Module, name: str, tensor: Tensor | None, spec: MoESpec) -> None:
    """Put the block's tensor where MoE expects it; refuse a shape the spec does not describe."""
    owner, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    slot = getattr(owner, attr)
    if slot is None and tensor is None:
        return
    if slot is None or tensor is None:
        raise MoeccError(f"MoE layer {spec.name or '?'}: {name} is {'missing' if tensor is None else 'unexpected'} "
                         f"for this spec (fix the recognizer's spec or weights)")
    if tuple(tensor.shape) != tuple(slot.shape):
        raise MoeccError(f"MoE layer {spec.name or '?'}: {name} has shape {tuple(tensor.shape)}, the spec "
                         f"expects {tuple(slot.shape)}")
    data = tensor.detach().contiguous()          # no copy when already contiguous
    setattr(owner, attr, nn.Parameter(data, requires_grad=slot.requires_grad and tensor.requires_grad))


def _materialize(module: nn.Module, device: torch.device) -> None:
    """MoE's own state that no block provides (e.g. its load counter) -> zeros on the weights' device."""
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner) if owner else module
            owner.register_buffer(attr, torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                                  persistent=attr not in owner._non_persistent_buffers_set)
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise MoeccError(f"MoE layer {module.spec.name or '?'}: no weights given for {left}")
