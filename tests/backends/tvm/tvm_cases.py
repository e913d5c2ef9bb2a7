"""Shared pieces of the TVM backend tests: MoE layer specs, their weights, and a Relax function that
runs one experts op (lower.emit_experts) with a given kernel, so many cases compile as ONE module.
Routing is not TVM's here: ids and weights come from moecc.routing.route, the one router definition."""
from __future__ import annotations

import numpy as np
import torch
from tvm import relax, tirx

from moecc.backends.tvm.lower import emit_experts
from moecc.ops import experts_reference
from moecc.routing import logits_width, route
from moecc.spec import MoESpec, RouterSpec

TENSORS = ("x", "ids", "weights", "w_in", "w_out", "b_in", "b_out")


def spec(name: str, E: int = 4, H: int = 16, F: int = 8, act: str = "gelu", **router) -> MoESpec:
    extra = {k: router.pop(k) for k in ("expert_bias", "interleaved", "shared_ffn", "shared_gated", "act_limit", "act_alpha")
             if k in router}
    return MoESpec(E, H, F, act, RouterSpec(**router), name=name, **extra).validate()


def weights(s: MoESpec, seed: int = 0) -> dict:
    """The experts' tensors at unit scale, so the experts dominate the output."""
    g = torch.Generator().manual_seed(seed)
    E, H, F, R = s.num_experts, s.hidden, s.ffn, s.in_rows
    rnd = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5   # noqa: E731
    t = {"w_in": rnd(E, R, H), "w_out": rnd(E, H, F)}
    if s.expert_bias:
        t["b_in"], t["b_out"] = rnd(E, R), rnd(E, H)
    return t


def relax_experts(bb: relax.BlockBuilder, name: str, s: MoESpec, w: dict, kernel: str) -> None:
    """Add function `name`(x [T, H], ids [T, S], weights [T, S], *expert weights) -> y [T, H]."""
    T = tirx.Var("t", "int64")
    S = s.num_experts if s.router.kind == "expert_choice" else s.top_k
    params = {"x": relax.Var("x", relax.TensorType((T, s.hidden), "float32")),
              "ids": relax.Var("ids", relax.TensorType((T, S), "int64")),
              "weights": relax.Var("weights", relax.TensorType((T, S), "float32"))}
    for k, v in w.items():
        params[k] = relax.Var(k, relax.TensorType(tuple(v.shape), "float32"))
    with bb.function(name, list(params.values())):
        with bb.dataflow():
            y = emit_experts(bb, {k: params.get(k) for k in TENSORS}, s, kernel)
            out = bb.emit_output(y)
        bb.emit_func_output(out)


def case_inputs(s: MoESpec, w: dict, tokens: int, rows: int = 1, seed: int = 1) -> dict:
    """x [T, H] and the (weights, ids) moecc.routing.route gives for random logits (rows: sequences)."""
    g = torch.Generator().manual_seed(seed + tokens)
    x = torch.randn(tokens, s.hidden, generator=g)
    logits = torch.randn(tokens, logits_width(s), generator=g) * 2
    token_ids = torch.randint(0, 30000, (tokens,), generator=g) if s.router.kind == "hash" else None
    bias = torch.randn(s.num_experts, generator=g) * 0.3 if s.router.kind == "sigmoid_topk" else None
    routing_weights, ids = route(logits, s, bias, token_ids, rows)
    return {"x": x, "ids": ids, "weights": routing_weights, **w}


def reference(s: MoESpec, t: dict) -> np.ndarray:
    return experts_reference(*[t.get(k) for k in TENSORS], s).numpy()


def ordered(t: dict) -> list[np.ndarray]:
    """The tensors in relax_experts' parameter order."""
    return [t[k].numpy() for k in TENSORS if k in t]
