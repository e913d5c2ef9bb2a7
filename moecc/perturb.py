"""Make routing matter: perturb each expert of each MoE layer differently (and the router).

    moe(E identical copies, zero router)  ⇒  moe(E distinct experts, random router)

An upcycled layer at initialization has E identical experts and routing weights that sum to one, so a
wrong router, experts in another order or a wrong expert index give the same output: a check on such a
graph proves nothing about routing. `perturb_experts` (on a copy) makes every expert differ and every
router decisive, so the reference and a backend agree only if they route and combine alike.
Used by compile-time verification (`routing_blind` decides when) and by the end-to-end tests.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from .pipeline import moe_nodes
from .quiet import torch_internal_deprecations

W_IN, W_OUT = 2, 3          # moecc::moe(x, logits, w_in, w_out, ...)


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def _router(gm: fx.GraphModule, logits) -> torch.Tensor | None:
    """The router weight [L, H] when logits = linear(x, get_attr) (as the FFN → MoE passes write it)."""
    if isinstance(logits, fx.Node) and logits.op == "call_function" and len(logits.args) >= 2:
        if "linear" in str(logits.target):
            return _attr(gm, logits.args[1])
    return None


def _identical(w: torch.Tensor | None) -> bool:
    return w is not None and w.shape[0] > 1 and bool((w == w[:1]).all())


def routing_blind(gm: fx.GraphModule) -> bool:
    """True when some MoE layer's output cannot depend on routing: identical experts, or a constant
    (all-zero) router so every token ties."""
    for node, _ in moe_nodes(gm):
        w_in, w_out = _attr(gm, node.args[W_IN]), _attr(gm, node.args[W_OUT])
        router = _router(gm, node.args[1])
        if (_identical(w_in) and _identical(w_out)) or (router is not None and not bool(router.any())):
            return True
    return False


@torch.no_grad()
def perturb_experts(gm: fx.GraphModule, scale: float = 0.3, seed: int = 0, inplace: bool = False) -> fx.GraphModule:
    """A copy of `gm` (or `gm` itself) whose experts differ: w[e] += scale·std(w)·N(0, 1) per expert,
    and whose routers are N(0, 1/H)·4 (decisive, distinct logits per expert). Returns the graph."""
    if not inplace:
        with torch_internal_deprecations():
            gm = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    for node, _ in moe_nodes(gm):
        for w in (_attr(gm, node.args[W_IN]), _attr(gm, node.args[W_OUT])):
            if w is not None and w.is_floating_point():
                noise = torch.randn(w.shape, generator=g, dtype=torch.float32)
                w.add_((noise * scale * float(w.float().std().clamp_min(1e-3))).to(w.dtype))
        router = _router(gm, node.args[1])
        if router is not None and router.is_floating_point():
            H = router.shape[-1]
            router.copy_(torch.randn(router.shape, generator=g) * (4.0 / H ** 0.5))
    return gm
