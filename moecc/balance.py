"""Load balancing: auxiliary losses a training loop adds to its loss, and aux-loss-free bias balancing.

    y = model(x)                                  # every moecc.nn.MoE stores its routing in .aux
    loss = task_loss + moecc.balance.aux_loss(model, {"switch": 1e-2, "z": 1e-3})
    loss.backward(); optimizer.step()
    moecc.balance.update_bias(model, rate=1e-3)   # sigmoid-topk layers: correction bias, no loss

Terms, per layer (T tokens, E experts, k slots), then averaged over the MoE layers that define them
(hash layers have no learned router and define none):
  switch      E · Σ_i f_i · P_i   f_i = share of the T·k choices (before capacity) that went to i,
              P_i = mean_t p_t(i) (router_probs).  = 1 when balanced.  Fedus et al. 2021, eq. 4–6;
              transformers' load_balancing_loss_func equals k × this.
  importance  CV²(Σ_t G_t)        G_t [E] = the token's gates after top-k.          Shazeer et al. 2017
  load        CV²(Σ_t P(t, ·))    P(t,i) = Φ((clean_i − kth_excluding(noisy_t, k, i)) / σ_t,i): the
              smooth chance that i stays in the top-k under new noise. Noisy top-k layers only.  ibid.
  z           mean_t logsumexp(l_t)²  (hierarchical: group and within-group softmaxes).  Zoph et al. 2022
CV² = population variance / mean² (as tensor2tensor's cv_squared).

Bias balancing (aux-loss-free, Wang et al. 2024; DeepSeek-V3), between steps, per sigmoid-topk layer:
    b_i ← b_i + rate · sign(mean_j load_j − load_i),   load = choices counted since the last update
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .errors import MoeccError
from .nn import MoE, moe_modules
from .routing import route, router_probs
from .spec import MoESpec

TERMS = ("switch", "importance", "load", "z")


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps) if x.numel() > 1 else x.new_zeros(())


def switch_loss(probs: Tensor, ids: Tensor) -> Tensor:
    """probs [T, E], ids [T, S] (−1 = none) -> E · Σ_i f_i · P_i."""
    E = probs.shape[-1]
    valid = ids >= 0
    counts = torch.zeros(E, device=probs.device).index_add_(0, ids[valid], torch.ones_like(ids[valid], dtype=torch.float))
    f = counts / counts.sum().clamp(min=1)                               # [E]
    return E * (f * probs.float().mean(dim=0)).sum()


def gates(logits: Tensor, spec: MoESpec, bias: Tensor | None = None) -> Tensor:
    """[T, L] -> [T, E] dense gate matrix G (the routed weights, zero elsewhere), with grad."""
    dropless = spec.replace(router=dataclasses.replace(spec.router, capacity_factor=None))
    w, ids = route(logits, dropless, bias)                               # [T, S]
    keep = ids >= 0
    return torch.zeros(logits.shape[0], spec.num_experts, dtype=w.dtype, device=w.device).scatter_add(
        1, ids.clamp(min=0), w * keep)


def importance_loss(gate_matrix: Tensor) -> Tensor:
    return cv_squared(gate_matrix.sum(dim=0))


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """[T, E] each -> [T, E]: P(expert i in the top-k if only its own noise were redrawn)."""
    E = clean.shape[-1]
    if k >= E:
        return torch.ones_like(clean)
    top = torch.topk(noisy, k + 1, dim=-1)[0]                            # [T, k+1]
    if_in, if_out = top[:, k:k + 1], top[:, k - 1:k]                     # (k+1)-th, k-th largest
    is_in = noisy > if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    p_in = normal.cdf((clean - if_in) / noise_std)
    p_out = normal.cdf((clean - if_out) / noise_std)
    return torch.where(is_in, p_in, p_out)


def load_loss(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    return cv_squared(prob_in_top_k(clean, noisy, noise_std, k).sum(dim=0))


def z_loss(logits: Tensor, spec: MoESpec) -> Tensor:
    logits = logits.float()
    if spec.router.kind != "hierarchical":
        return (torch.logsumexp(logits, dim=-1) ** 2).mean()
    G, E = spec.router.n_groups, spec.num_experts
    inner = logits[:, G:].reshape(-1, G, E // G)
    return (torch.logsumexp(logits[:, :G], dim=-1) ** 2).mean() + (torch.logsumexp(inner, -1) ** 2).mean()


def layer_terms(m: MoE, names=TERMS) -> dict[str, Tensor]:
    """The aux terms of one MoE layer from its last training forward."""
    a, spec = m.aux, m.spec
    out = {}
    if spec.router.kind == "hash":
        return out
    if "switch" in names:
        out["switch"] = switch_loss(router_probs(a["logits"], spec), a["ids"])
    if "importance" in names:
        out["importance"] = importance_loss(gates(a["logits"], spec, a["bias"]))
    if "load" in names:
        if a["noise_std"] is None or spec.router.kind == "hierarchical":
            raise MoeccError(f"MoE layer {spec.name or '?'}: the load loss needs noisy top-k "
                             f"(RouterSpec(noisy=True), not hierarchical); use 'switch' or 'importance'")
        out["load"] = load_loss(a["clean"], a["logits"], a["noise_std"], spec.top_k)
    if "z" in names:
        out["z"] = z_loss(a["clean"], spec)
    return out


def _layers(model: nn.Module) -> list[MoE]:
    layers = [m for m in moe_modules(model).values() if m.aux]
    if not layers:
        raise MoeccError("no MoE layer has routing from a training forward: call aux_loss after "
                         "model(x) in train mode (model.train())")
    return layers


def aux_terms(model: nn.Module, names=TERMS) -> dict[str, Tensor]:
    """Each term averaged over the layers that define it (differentiable)."""
    unknown = [n for n in names if n not in TERMS]
    if unknown:
        raise MoeccError(f"unknown aux loss {unknown[0]!r}; choose from {', '.join(TERMS)}")
    per_layer = [layer_terms(m, names) for m in _layers(model)]
    return {n: torch.stack([t[n] for t in per_layer if n in t]).mean()
            for n in names if any(n in t for t in per_layer)}


def aux_loss(model: nn.Module, weights: dict[str, float]) -> Tensor:
    """Σ_name weight · term: add it to the training loss after each forward."""
    names = [n for n, w in weights.items() if w]
    terms = aux_terms(model, names)
    total = sum((weights[n] * t for n, t in terms.items()), torch.zeros(()))
    return total


def update_bias(model: nn.Module, rate: float) -> dict[str, float]:
    """Aux-loss-free balancing step; returns per layer max/mean of the load it balanced."""
    layers = [m for m in moe_modules(model).values() if m.correction_bias is not None]
    if not layers:
        raise MoeccError("bias balancing needs sigmoid-topk routers (a correction bias); the model "
                         "has none: use --router sigmoid-topk or an aux loss")
    report = {}
    with torch.no_grad():
        for m in layers:
            load = m.load.float()                                        # [E]
            if load.sum() > 0:
                m.correction_bias += rate * torch.sign(load.mean() - load).to(m.correction_bias)
                report[m.spec.name] = float(load.max() / load.mean())
            m.load.zero_()
    return report
