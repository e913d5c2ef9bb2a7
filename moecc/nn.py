"""Trainable MoE module: a router Linear plus stacked experts, calling `torch.ops.moecc.moe`.

    x [..., H] → logits = router(x) / τ [+ N(0,1)·softplus(noise(x))]₍train₎ [− ∞ on dropped experts]₍train₎
               → moecc::moe(x, logits, w_in [E, R, H], w_out [E, H, F], ...) → y [..., H]

Everything random or learned about routing happens OUTSIDE the op, so the op stays a deterministic
function of its inputs: noisy top-k (Shazeer et al. 2017: noise scaled by a learned softplus term,
training only), a learnable temperature τ (also at inference: exported as an ordinary mul), expert
dropout (training only: each expert is unavailable for a whole step with probability p, never
leaving fewer than k). torch.export of a model in eval mode keeps each `MoE` as one `moecc::moe`
node (the router Linear stays an ordinary node whose output is the op's `logits` input).

Aux-loss mechanism: during a training forward every MoE stores what the balancing losses need in
`self.aux` (logits with grad, clean logits, noise std, correction bias, token ids) and adds its
chosen experts' counts to `self.load` (consumed by `moecc.balance.update_bias`). A training loop
adds `moecc.balance.aux_loss(model, {"switch": 0.01, "z": 1e-3})` to its loss after each forward.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import MoeccError
from .ops import OP_ARGS, call_moe
from .pipeline import attr
from .routing import check, expert_load, logits_width, route
from .spec import MoESpec


class MoE(nn.Module):
    """y = Σ_k w_k(x) · expert_{i_k}(x) [+ shared(x)], experts stacked: w_in [E, R, H], w_out [E, H, F]."""

    def __init__(self, spec: MoESpec, *, router_bias: bool = False, init_std: float = 0.02,
                 kernel: str = "reference", learn_temperature: bool = False, expert_dropout: float = 0.0):
        super().__init__()
        self.spec = check(spec)
        if not 0.0 <= expert_dropout < 1.0:
            raise MoeccError(f"MoE layer {spec.name or '?'}: expert dropout must be in [0, 1), got {expert_dropout}")
        E, H, Fd, R, L = spec.num_experts, spec.hidden, spec.ffn, spec.in_rows, logits_width(spec)
        self.router = nn.Linear(H, L, bias=router_bias)
        self.w_in = nn.Parameter(torch.randn(E, R, H) * init_std)
        self.w_out = nn.Parameter(torch.randn(E, H, Fd) * init_std)
        self.b_in = nn.Parameter(torch.zeros(E, R)) if spec.expert_bias else None
        self.b_out = nn.Parameter(torch.zeros(E, H)) if spec.expert_bias else None
        self.correction_bias = (nn.Parameter(torch.zeros(E), requires_grad=False)
                                if spec.router.kind == "sigmoid_topk" else None)
        if spec.shared_ffn:
            self.shared_w_in = nn.Parameter(torch.randn(spec.shared_in_rows, H) * init_std)
            self.shared_w_out = nn.Parameter(torch.randn(H, spec.shared_ffn) * init_std)
            self.shared_gate = nn.Parameter(torch.randn(1, H) * init_std) if spec.shared_gated else None
        else:
            self.shared_w_in = self.shared_w_out = self.shared_gate = None
        # noisy top-k: W_noise starts at zero (Shazeer et al.): noise std softplus(0) ≈ 0.69 at first
        self.noise = nn.Linear(H, L, bias=False) if spec.router.noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        self.log_temperature = nn.Parameter(torch.zeros(())) if learn_temperature else None
        self.expert_dropout = expert_dropout
        self.kernel = kernel
        self.aux: dict = {}
        self.register_buffer("load", torch.zeros(E), persistent=False)   # [E] since last bias update

    def _float(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        if self.spec.router.fp32:
            b = None if layer.bias is None else layer.bias.float()
            return F.linear(x.float(), layer.weight.float(), b)
        return layer(x)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., L] clean logits (temperature applied); fp32 when the spec asks."""
        logits = self._float(x, self.router)
        if self.log_temperature is not None:
            logits = logits * torch.exp(-self.log_temperature)
        return logits

    def _drop_experts(self, logits: torch.Tensor, bias: torch.Tensor | None):
        """Whole experts unavailable this step: their logits (and choosing bias) pushed to -big."""
        E, k = self.spec.num_experts, self.spec.top_k
        keep = torch.rand(E, device=logits.device) >= self.expert_dropout            # [E]
        if int(keep.sum()) < k:
            keep[torch.randperm(E, device=logits.device)[:k]] = True
        big = torch.finfo(logits.dtype).min / 4
        mask = torch.where(keep, 0.0, big).to(logits.dtype)                        # [E]
        mask = F.pad(mask, (logits.shape[-1] - E, 0))                               # groups first
        if bias is not None:
            bias = bias + torch.where(keep, 0.0, big).to(bias.dtype)
        return logits + mask, bias

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        clean = self.router_logits(x)                                               # [..., L]
        logits, bias, noise_std = clean, self.correction_bias, None
        if self.training:
            if self.noise is not None:
                noise_std = F.softplus(self._float(x, self.noise))                  # [..., L]
                logits = clean + torch.randn_like(clean) * noise_std
            if self.expert_dropout > 0 and self.spec.router.kind != "hash":
                logits, bias = self._drop_experts(logits, bias)
            self._remember(clean, logits, noise_std, bias, token_ids)
        return call_moe(x, logits, self.w_in, self.w_out, self.spec, b_in=self.b_in, b_out=self.b_out,
                        router_bias=bias, shared_w_in=self.shared_w_in, shared_w_out=self.shared_w_out,
                        shared_gate=self.shared_gate, token_ids=token_ids, kernel=self.kernel)

    def _remember(self, clean, logits, noise_std, bias, token_ids) -> None:
        L = logits.shape[-1]
        flat = {"logits": logits.reshape(-1, L), "clean": clean.reshape(-1, L),
                "noise_std": None if noise_std is None else noise_std.reshape(-1, L),
                "bias": bias, "token_ids": token_ids}
        with torch.no_grad():       # the experts each token chose, before any capacity drop
            chosen = self.spec.replace(router=_dropless(self.spec.router))
            ids = route(flat["logits"], chosen, bias, token_ids)[1]
            self.load += expert_load(ids, self.spec.num_experts).to(self.load)
        self.aux = {**flat, "ids": ids}

    def extra_repr(self) -> str:
        s = self.spec
        return f"E={s.num_experts}, k={s.top_k}, H={s.hidden}, F={s.ffn}, act={s.activation}, router={s.router.kind}"


def _dropless(r):
    return dataclasses.replace(r, capacity_factor=None)


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every MoE module of a model by its path; unnamed specs get their path as name (for monitors)."""
    found = {}
    for path, m in model.named_modules():
        if isinstance(m, MoE):
            if not m.spec.name:
                m.spec = m.spec.replace(name=path)
            found[path] = m
    return found


# --- a captured / transformed graph's MoE layers as trainable modules ---------------------------

_CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.alias.default,
          torch.ops.aten.clone.default}


def _tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise MoeccError(f"node {getattr(node, 'name', node)}: expected a parameter (get_attr)")
    return attr(gm, node.target).detach().clone()


def _router_weights(gm: fx.GraphModule, logits: fx.Node, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits = linear(x, W[, b]) or cat([linear, linear], -1)  ->  (W [L, H], b [L] or None)."""
    while logits.op == "call_function" and logits.target in _CASTS:
        logits = logits.args[0]
    parts = logits.args[0] if logits.target is torch.ops.aten.cat.default else [logits]
    ws, bs = [], []
    for p in parts:
        if not (isinstance(p, fx.Node) and p.target is torch.ops.aten.linear.default):
            raise MoeccError(f"{where}: the router logits are not a Linear of the layer input "
                             f"({getattr(p, 'name', p)}); cannot build a trainable module")
        ws.append(_tensor(gm, p.args[1]))
        bs.append(_tensor(gm, p.args[2]) if len(p.args) > 2 else None)
    if any(b is not None for b in bs):
        bs = [b if b is not None else torch.zeros(w.shape[0]) for w, b in zip(ws, bs)]
        return torch.cat(ws), torch.cat(bs)
    return torch.cat(ws), None


def from_graph(gm: fx.GraphModule, **kw) -> dict[str, MoE]:
    """Each moecc::moe node of `gm` -> an `MoE` module holding its weights, keyed by spec.name
    (for an upcycled model: the FFN's module path, so `model.set_submodule(name, moe)` swaps it in).
    `kw` goes to `MoE(...)` (learn_temperature, expert_dropout, kernel)."""
    from .pipeline import moe_nodes
    out = {}
    for node, spec in moe_nodes(gm):
        where = f"MoE layer {spec.name or node.name}"
        w, b = _router_weights(gm, node.args[1], where)
        m = MoE(spec, router_bias=b is not None, **kw)
        with torch.no_grad():
            m.router.weight.copy_(w)
            if b is not None:
                m.router.bias.copy_(b)
            for name in OP_ARGS[2:10]:                   # w_in .. shared_gate
                arg, target = node.args[OP_ARGS.index(name)], getattr(m, _ATTR.get(name, name))
                if arg is not None and target is not None:    # a router_bias only sigmoid_topk reads
                    target.copy_(_tensor(gm, arg))
        out[spec.name or node.name] = m
    return out


_ATTR = {"router_bias": "correction_bias"}
