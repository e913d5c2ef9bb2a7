"""Shared pieces of the TVM backend tests: MoE layer specs, their weights, and a Relax function that
runs one MoE op (emit_moe) with a given kernel, so many cases compile as ONE module."""
from __future__ import annotations

import numpy as np
import torch
from tvm import relax, tirx

from moecc.backends.tvm.lower import emit_moe
from moecc.ops import OP_ARGS, moe_reference
from moecc.routing import logits_width
from moecc.spec import MoESpec, RouterSpec

TENSORS = OP_ARGS[:-2]


def spec(name: str, E: int = 4, H: int = 16, F: int = 8, act: str = "gelu", **router) -> MoESpec:
    extra = {k: router.pop(k) for k in ("expert_bias", "interleaved", "shared_ffn", "shared_gated")
             if k in router}
    return MoESpec(E, H, F, act, RouterSpec(**router), name=name, **extra).validate()


def weights(s: MoESpec, seed: int = 0) -> dict:
    """The op's tensors (x and logits excepted) at unit scale, so the experts dominate the output."""
    g = torch.Generator().manual_seed(seed)
    E, H, F, R = s.num_experts, s.hidden, s.ffn, s.in_rows
    rnd = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5   # noqa: E731
    t = {"w_in": rnd(E, R, H), "w_out": rnd(E, H, F)}
    if s.expert_bias:
        t["b_in"], t["b_out"] = rnd(E, R), rnd(E, H)
    if s.router.kind == "sigmoid_topk":
        t["router_bias"] = rnd(E)
    if s.shared_ffn:
        Rs = 2 * s.shared_ffn if s.gated else s.shared_ffn
        t["shared_w_in"], t["shared_w_out"] = rnd(Rs, H), rnd(H, s.shared_ffn)
        if s.shared_gated:
            t["shared_gate"] = rnd(1, H)
    return t


def relax_moe(bb: relax.BlockBuilder, name: str, s: MoESpec, w: dict, kernel: str, rows: int = 0) -> None:
    """Add function `name`(x, logits[, token_ids], *weights) -> y: x [T, H], or [rows, S, H] if rows."""
    T = tirx.Var("t", "int64")
    lead = (rows, T) if rows else (T,)
    x = relax.Var("x", relax.TensorType((*lead, s.hidden), "float32"))
    logits = relax.Var("logits", relax.TensorType((*lead, logits_width(s)), "float32"))
    params = {"x": x, "logits": logits}
    if s.router.kind == "hash":
        params["token_ids"] = relax.Var("token_ids", relax.TensorType(lead, "int64"))
    for k, v in w.items():
        params[k] = relax.Var(k, relax.TensorType(tuple(v.shape), "float32"))
    with bb.function(name, list(params.values())):
        with bb.dataflow():
            y = emit_moe(bb, {k: params.get(k) for k in TENSORS}, s, kernel)
            out = bb.emit_output(y)
        bb.emit_func_output(out)


def case_inputs(s: MoESpec, w: dict, tokens: int, rows: int = 0, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed + tokens)
    lead = (rows, tokens) if rows else (tokens,)
    t = {"x": torch.randn(*lead, s.hidden, generator=g),
         "logits": torch.randn(*lead, logits_width(s), generator=g) * 2}
    if s.router.kind == "hash":
        t["token_ids"] = torch.randint(0, 30000, lead, generator=g)
    return {**t, **w}


def reference(s: MoESpec, t: dict) -> np.ndarray:
    return moe_reference(*[t.get(k) for k in TENSORS], s).numpy()


def ordered(t: dict) -> list[np.ndarray]:
    """The tensors in relax_moe's parameter order."""
    keys = ["x", "logits"] + (["token_ids"] if "token_ids" in t else [])
    keys += [k for k in t if k not in keys]
    return [t[k].numpy() for k in keys]
