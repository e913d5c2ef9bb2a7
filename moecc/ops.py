"""The canonical MoE op `torch.ops.moecc.moe` and its ONE PyTorch reference implementation.

    moe(x [..., H], logits [..., L], w_in [E, R, H], w_out [E, H, F], ...) -> y [..., H]

R = F, or 2F for gated activations. torch.export keeps the op as one node (fake kernel below);
autograd recomputes the reference, so gradients reach x, the router logits and every expert weight.
The `spec` argument is `MoESpec.to_json()`; `kernel` names the implementation that runs it
("reference", or a torch backend kernel such as "torch.grouped_gemm").
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import HALF, route
from .spec import MoESpec

OP_ARGS = ("x", "logits", "w_in", "w_out", "b_in", "b_out", "router_bias",
           "shared_w_in", "shared_w_out", "shared_gate", "token_ids", "spec", "kernel")
_observers: contextvars.ContextVar[tuple] = contextvars.ContextVar("moecc_routing_observers", default=())


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> MoESpec:
    return MoESpec.from_json(spec)


@contextlib.contextmanager
def record_routing():
    """Collect one record per executed MoE layer (forward only): {layer, expert_ids [T, S],
    weights [T, S], spec}, from a moe node (its routing) or an experts node (the ids and weights
    it is given: a decomposed layer)."""
    records: list = []
    token = _observers.set(_observers.get() + (records,))     # context-local: this thread/task only
    try:
        yield records
    finally:
        _observers.reset(token)


def activate(h: Tensor, spec: MoESpec) -> Tensor:
    """[n, R] -> [n, F]: the expert's activation, gated variants split [gate; up] (or interleaved)."""
    a = spec.activation
    if a == "relu":
        return F.relu(h)
    if a == "relu2":            # squared ReLU (Nemotron-H's experts): relu(h)², as torch.square
        return torch.square(F.relu(h))
    if a == "gelu":
        return F.gelu(h)
    if a == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if a == "silu":
        return F.silu(h)
    gate, up = (h[..., ::2], h[..., 1::2]) if spec.interleaved else h.chunk(2, dim=-1)
    if a == "swiglu":
        return F.silu(gate) * up
    if a == "geglu":
        return F.gelu(gate) * up
    if a == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if a == "swiglu_clamp":     # Hunyuan-V4: silu(min(gate, L)) * clamp(up, -L, L)
        return F.silu(gate.clamp(max=spec.act_limit)) * up.clamp(min=-spec.act_limit, max=spec.act_limit)
    if a == "swiglu_softcap":   # Inkling-2: cap_g·tanh(gate/cap_g) · sigmoid(gate) · cap_u·tanh(up/cap_u), in fp32
        dt = torch.promote_types(gate.dtype, torch.float32)      # half types in float32, as Inkling-2
        g, u = gate.to(dt), up.to(dt)
        cg, cu = spec.act_limit, spec.act_alpha
        return (torch.tanh(g / cg) * cg * torch.sigmoid(g) * (torch.tanh(u / cu) * cu)).to(h.dtype)
    # swiglu_oai (GPT-OSS): clamped, (up + 1) * gate * sigmoid(alpha * gate)
    gate = gate.clamp(max=spec.act_limit)
    up = up.clamp(min=-spec.act_limit, max=spec.act_limit)
    return (up + 1) * (gate * torch.sigmoid(gate * spec.act_alpha))


def linear(x: Tensor, w: Tensor, b: Tensor | None, spec: MoESpec) -> Tensor:
    """x · wᵀ + b with the bias added where spec.bias_add says: in the GEMM (one rounding) or to its
    result (x @ W, then + b: two roundings in half precision, as GPT-OSS)."""
    if b is None or spec.bias_add == "in_gemm":
        return F.linear(x, w, b)
    return F.linear(x, w) + b


def ffn(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None,
        spec: MoESpec) -> Tensor:
    """One expert: [n, H] -> [n, H]."""
    return linear(activate(linear(x, w_in, b_in, spec), spec), w_out, b_out, spec)


def weigh(h: Tensor, w: Tensor, spec: MoESpec, inplace: bool = False) -> Tensor:
    """h [n, H] (an expert's outputs) scaled by its routing weights w [n, 1], in h's dtype, as
    spec.combine says (moecc.spec.COMBINES): "weight_in_act" rounds w to h's dtype first;
    "weight_fp32" multiplies in float32 and rounds the product (only half types differ)."""
    if spec.combine == "weight_fp32" and h.dtype in HALF:
        p = h.float() * w.float()
        return h.copy_(p) if inplace else p.to(h.dtype)
    w = w.to(h.dtype)
    return h.mul_(w) if inplace else h * w


def shared_expert(x: Tensor, w_in: Tensor, w_out: Tensor, gate: Tensor | None, spec: MoESpec) -> Tensor:
    y = ffn(x, w_in, None, w_out, None, spec)
    if gate is not None:
        y = torch.sigmoid(F.linear(x, gate)) * y
    return y


def routed(x: Tensor, logits: Tensor, router_bias, token_ids, spec: MoESpec):
    """x [..., H] -> (xt [T, H], weights [T, S], ids [T, S]): the tokens flattened and routed.
    Shared by the reference, every torch kernel and moecc.decompose, so they route identically."""
    xt = x.reshape(-1, x.shape[-1])                                        # [T, H]
    rows = math.prod(x.shape[:-2]) if x.dim() > 2 else 1                   # sequences (per-row capacity)
    weights, ids = route(logits.reshape(xt.shape[0], logits.shape[-1]), spec, router_bias, token_ids, rows)
    return xt, weights, ids


def route_tokens(x: Tensor, logits: Tensor, router_bias, token_ids, spec: MoESpec):
    """`routed`, recorded for record_routing() (the moe op's own routing)."""
    xt, weights, ids = routed(x, logits, router_bias, token_ids, spec)
    _notify(spec, ids, weights)
    return xt, weights, ids


def experts_reference(xt: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor,
                      b_in: Tensor | None, b_out: Tensor | None, spec: MoESpec) -> Tensor:
    """The experts level: xt [T, H], ids [T, S] (int64, -1 = no expert), weights [T, S] -> y [T, H].

    Loop over the experts w_in/w_out hold (E' = w_in.shape[0]: all of a layer's, or one rank's local
    experts with ids renumbered); each takes the rows routed to it. The definition every experts
    kernel must match: each expert's output is weighed (`weigh`, spec.combine) and summed into zeros
    of xt's dtype in ascending expert order, token order within an expert (index_add_)."""
    y = torch.zeros_like(xt)
    for e in range(w_in.shape[0]):
        tok, slot = torch.where(ids == e)                                  # tokens routed to e
        if tok.numel() == 0:
            continue
        h = ffn(xt[tok], w_in[e], None if b_in is None else b_in[e], w_out[e],
                None if b_out is None else b_out[e], spec)                 # [n, H]
        y = y.index_add(0, tok, weigh(h, weights[tok, slot].unsqueeze(-1), spec))
    return y


def moe_reference(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out,
                  shared_gate, token_ids, spec: MoESpec) -> Tensor:
    """Route, then the experts (`experts_reference`), the shared expert added last (as HF's eager
    experts loops do). The definition every moe kernel must match."""
    shape = x.shape
    xt, weights, ids = route_tokens(x, logits, router_bias, token_ids, spec)   # [T, H], [T, S], [T, S]
    y = experts_reference(xt, ids, weights, w_in, w_out, b_in, b_out, spec)
    if shared_w_in is not None:
        y = y + shared_expert(xt, shared_w_in, shared_w_out, shared_gate, spec)
    return y.reshape(shape)


def _notify(spec: MoESpec, ids: Tensor, weights: Tensor) -> None:
    for records in _observers.get():
        records.append({"layer": spec.name, "expert_ids": ids.detach(), "weights": weights.detach(),
                        "spec": spec})


@contextlib.contextmanager
def _muted():
    """The backward pass recomputes the forward: it must not be recorded a second time."""
    token = _observers.set(())
    try:
        yield
    finally:
        _observers.reset(token)


def run_kernel(kernel: str, *tensors, spec: MoESpec) -> Tensor:
    if kernel in ("", "reference", "torch.reference"):
        return moe_reference(*tensors, spec)
    # Kernels are named by string in the IR and resolved lazily: the IR never imports a backend.
    return importlib.import_module("moecc.backends.torch.select").run(kernel, *tensors, spec=spec)


@torch.library.custom_op("moecc::moe", mutates_args=())
def moe(x: Tensor, logits: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor],
        b_out: Optional[Tensor], router_bias: Optional[Tensor], shared_w_in: Optional[Tensor],
        shared_w_out: Optional[Tensor], shared_gate: Optional[Tensor], token_ids: Optional[Tensor],
        spec: str, kernel: str) -> Tensor:
    return run_kernel(kernel, x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in,
                      shared_w_out, shared_gate, token_ids, spec=parse_spec(spec)).contiguous()


@moe.register_fake
def _moe_fake(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out,
              shared_gate, token_ids, spec, kernel):
    return torch.empty_like(x)


_DIFF = ("x", "logits", "w_in", "w_out", "b_in", "b_out", "shared_w_in", "shared_w_out", "shared_gate")


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs   # recomputed in backward: activations are not saved twice


def _backward(ctx, grad):
    *tensors, spec, _kernel = ctx.inputs
    names = OP_ARGS[:-2]
    wanted = [n for i, n in enumerate(names) if n in _DIFF and ctx.needs_input_grad[i]]
    with torch.enable_grad(), _muted():
        leaves = {n: t.detach().requires_grad_(True) for n, t in zip(names, tensors) if n in wanted}
        args = [leaves.get(n, t) for n, t in zip(names, tensors)]
        y = moe_reference(*args, parse_spec(spec))
        grads = torch.autograd.grad(y, [leaves[n] for n in wanted], grad, allow_unused=True)
    by_name = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(wanted, grads)}
    return (*[by_name.get(n) for n in names], None, None)


moe.register_autograd(_backward, setup_context=_setup_context)


def call_moe(x: Tensor, logits: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec, *,
             b_in=None, b_out=None, router_bias=None, shared_w_in=None, shared_w_out=None,
             shared_gate=None, token_ids=None, kernel: str = "reference") -> Tensor:
    """Keyword-friendly front door to `torch.ops.moecc.moe`."""
    return torch.ops.moecc.moe(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in,
                               shared_w_out, shared_gate, token_ids, spec.to_json(), kernel)


# ---------------------------------------------------------------------------------------------------
# The experts level (below routing): `torch.ops.moecc.experts`, the kernels' unit and the place an
# expert-parallel split puts its all-to-all (dispatch → experts on local weights → combine).
#
#     experts(x [T, H], ids [T, S] int64, weights [T, S], w_in [E', R, H], w_out [E', H, F],
#             b_in [E', R]?, b_out [E', H]?, spec, kernel) -> y [T, H]
#
# ids == -1 marks an empty slot (dropped by capacity / not chosen): it contributes nothing.

EXPERTS_ARGS = ("x", "ids", "weights", "w_in", "w_out", "b_in", "b_out", "spec", "kernel")
_EXPERTS_DIFF = ("x", "weights", "w_in", "w_out", "b_in", "b_out")


def run_experts_kernel(kernel: str, x, ids, weights, w_in, w_out, b_in, b_out, spec: MoESpec) -> Tensor:
    if kernel in ("", "reference", "torch.reference"):
        return experts_reference(x, ids, weights, w_in, w_out, b_in, b_out, spec)
    select = importlib.import_module("moecc.backends.torch.select")
    return select.run_experts(kernel, x, ids, weights, w_in, w_out, b_in, b_out, spec=spec)


@torch.library.custom_op("moecc::experts", mutates_args=())
def experts(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor,
            b_in: Optional[Tensor], b_out: Optional[Tensor], spec: str, kernel: str) -> Tensor:
    s = parse_spec(spec)
    _notify(s, ids, weights)        # a decomposed layer's routing, recorded where it is consumed
    return run_experts_kernel(kernel, x, ids, weights, w_in, w_out, b_in, b_out, s).contiguous()


@experts.register_fake
def _experts_fake(x, ids, weights, w_in, w_out, b_in, b_out, spec, kernel):
    return torch.empty_like(x)


def _experts_backward(ctx, grad):
    *tensors, spec, _kernel = ctx.inputs
    names = EXPERTS_ARGS[:-2]
    wanted = [n for i, n in enumerate(names) if n in _EXPERTS_DIFF and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        leaves = {n: t.detach().requires_grad_(True) for n, t in zip(names, tensors) if n in wanted}
        args = [leaves.get(n, t) for n, t in zip(names, tensors)]
        y = experts_reference(*args, parse_spec(spec))
        # no row reached any expert (e.g. an expert-parallel rank that received nothing): y is
        # zeros with no graph, every gradient is zero
        grads = (torch.autograd.grad(y, [leaves[n] for n in wanted], grad, allow_unused=True)
                 if y.requires_grad else [None] * len(wanted))
    by_name = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(wanted, grads)}
    return (*[by_name.get(n) for n in names], None, None)


experts.register_autograd(_experts_backward, setup_context=_setup_context)


def call_experts(x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, spec: MoESpec,
                 *, b_in=None, b_out=None, kernel: str = "reference") -> Tensor:
    """Keyword-friendly front door to `torch.ops.moecc.experts`."""
    return torch.ops.moecc.experts(x, ids, weights, w_in, w_out, b_in, b_out, spec.to_json(), kernel)
