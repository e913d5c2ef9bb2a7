"""Sparse upcycling: every dense FFN becomes an MoE of E identical copies of it.

    Linear(W1, b1) → act → Linear(W2, b2)          ⇒  moe(E experts = copies, top-k, new router)
    (act(x·Wg) ⊙ x·Wu)·Wd                           ⇒  moe(E gated experts, w_in = [Wg; Wu])

At initialization the MoE equals the dense model: identical experts, routing weights that sum to 1
(softmax → top-k → renormalize), whatever the router's initial weights (zeros or small random).
"""
from __future__ import annotations

import torch
from torch import fx

from moecc.errors import MoeccError
from moecc.pipeline import PassResult
from moecc.spec import MoESpec, RouterSpec

from .ffn_match import LOOKED_FOR, FFNMatch, find_ffns
from .moe_rewrite import param, replace_ffn, select_layers


def check_experts(num_experts: int, top_k: int) -> None:
    if num_experts < 2:
        raise MoeccError(f"--upcycle/--moefy needs at least 2 experts, got E={num_experts}")
    if not 1 <= top_k <= num_experts:
        raise MoeccError(f"--top-k must be between 1 and E={num_experts}, got {top_k}")


def no_ffn_error(refusals) -> MoeccError:
    why = "; refused: " + "; ".join(map(str, refusals[:5])) if refusals else ""
    return MoeccError(f"no dense FFN found; looked for {LOOKED_FOR}{why}")


def upcycled_tensors(gm: fx.GraphModule, m: FFNMatch, E: int, router_init: str,
                     generator: torch.Generator) -> dict:
    w_in = torch.cat([param(gm, w) for w in m.w_in], dim=0)               # [R, H]
    b_parts = [param(gm, b) for b in m.b_in]
    has_bias = any(b is not None for b in b_parts) or m.b_out is not None
    H = w_in.shape[1]
    router = torch.zeros(E, H, dtype=w_in.dtype)
    if router_init == "random":
        router = (torch.randn(E, H, generator=generator) * 0.02).to(w_in.dtype)
    elif router_init != "zeros":
        raise MoeccError(f"--router-init must be zeros or random, got {router_init!r}")
    t = {"router": router, "w_in": w_in.expand(E, *w_in.shape).clone(),
         "w_out": param(gm, m.w_out).expand(E, -1, -1).clone()}
    if has_bias:
        b_in = torch.cat([b if b is not None else torch.zeros(p.shape[0], dtype=w_in.dtype)
                          for b, p in zip(b_parts, (param(gm, w) for w in m.w_in))])
        b_out = param(gm, m.b_out) if m.b_out is not None else torch.zeros(H, dtype=w_in.dtype)
        t["b_in"], t["b_out"] = b_in.expand(E, -1).clone(), b_out.expand(E, -1).clone()
    return t


def upcycle(gm: fx.GraphModule, num_experts: int = 8, top_k: int = 2, layers: str = "all",
            router_init: str = "zeros", seed: int = 0) -> PassResult:
    check_experts(num_experts, top_k)
    matches, refusals = find_ffns(gm)
    if not matches:
        raise no_ffn_error(refusals)
    generator = torch.Generator().manual_seed(seed)
    chosen = select_layers(layers, len(matches))
    for i in chosen:
        m = matches[i]
        t = upcycled_tensors(gm, m, num_experts, router_init, generator)
        spec = MoESpec(num_experts=num_experts, hidden=t["w_in"].shape[2], ffn=t["w_out"].shape[2],
                       activation=m.activation, router=RouterSpec("softmax_topk", top_k, renormalize=True),
                       expert_bias="b_in" in t, name=m.name).validate()
        replace_ffn(gm, m, i, spec, t)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, True, {"ffn_found": len(matches), "ffn_rewritten": len(chosen),
                                 "refused": len(refusals)})


def make(options: dict):
    kw = {k: options[k] for k in ("num_experts", "top_k", "layers", "router_init", "seed") if k in options}
    return lambda gm: upcycle(gm, **kw)
