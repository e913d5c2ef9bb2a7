"""Trainable MoE module: a router Linear plus stacked experts, calling `torch.ops.moecc.moe`.

torch.export keeps each `MoE` as one `moecc::moe` node (the router Linear stays an ordinary node
whose output is the op's `logits` input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import call_moe
from .spec import MoESpec


class MoE(nn.Module):
    """y = Σ_k w_k(x) · expert_{i_k}(x) [+ shared(x)], experts stacked: w_in [E, R, H], w_out [E, H, F]."""

    def __init__(self, spec: MoESpec, *, router_bias: bool = False, init_std: float = 0.02,
                 kernel: str = "reference"):
        super().__init__()
        self.spec = spec.validate()
        E, H, Fd, R = spec.num_experts, spec.hidden, spec.ffn, spec.in_rows
        logits = E + spec.router.n_groups if spec.router.kind == "hierarchical" else E
        self.router = nn.Linear(H, logits, bias=router_bias)
        self.w_in = nn.Parameter(torch.randn(E, R, H) * init_std)
        self.w_out = nn.Parameter(torch.randn(E, H, Fd) * init_std)
        self.b_in = nn.Parameter(torch.zeros(E, R)) if spec.expert_bias else None
        self.b_out = nn.Parameter(torch.zeros(E, H)) if spec.expert_bias else None
        self.correction_bias = (nn.Parameter(torch.zeros(E), requires_grad=False)
                                if spec.router.kind == "sigmoid_topk" else None)
        if spec.shared_ffn:
            Rs = 2 * spec.shared_ffn if spec.gated else spec.shared_ffn
            self.shared_w_in = nn.Parameter(torch.randn(Rs, H) * init_std)
            self.shared_w_out = nn.Parameter(torch.randn(H, spec.shared_ffn) * init_std)
            self.shared_gate = nn.Parameter(torch.randn(1, H) * init_std) if spec.shared_gated else None
        else:
            self.shared_w_in = self.shared_w_out = self.shared_gate = None
        self.kernel = kernel

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., L]; in fp32 when the spec asks for an fp32 router."""
        if self.spec.router.fp32:
            b = None if self.router.bias is None else self.router.bias.float()
            return F.linear(x.float(), self.router.weight.float(), b)
        return self.router(x)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.router_logits(x)
        return call_moe(x, logits, self.w_in, self.w_out, self.spec, b_in=self.b_in, b_out=self.b_out,
                        router_bias=self.correction_bias, shared_w_in=self.shared_w_in,
                        shared_w_out=self.shared_w_out, shared_gate=self.shared_gate,
                        token_ids=token_ids, kernel=self.kernel)

    def extra_repr(self) -> str:
        s = self.spec
        return f"E={s.num_experts}, k={s.top_k}, H={s.hidden}, F={s.ffn}, act={s.activation}, router={s.router.kind}"
