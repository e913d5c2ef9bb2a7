"""onnxruntime's fused `com.microsoft::MoE` for the layers whose semantics it matches exactly.

    moecc::moe(x, logits, w_in, w_out, b_in?, b_out?, shared?)
        ⇒  com.microsoft::MoE(x [T, H], logits [T, E], w_in, b_in, w_out, b_out) [· scaling] [+ shared(x)]

What the CPU kernel computes (onnxruntime 1.32, checked by tests/backends/onnx/test_onnx_fused.py):
`router_probs` are raw logits in the input's dtype: softmax over all E, top-k, divided by their sum when
normalize_routing_weights=1 (so topk_softmax is normalize=1 too); weights in the nn.Linear layout
(E, out, in) — the old (E, in, out) layout still runs and gives wrong numbers, so never transpose;
activation "gelu" is the tanh approximation; "swiglu" needs swiglu_fusion=1 (gate/up interleaved
row by row) and is G·sigmoid(alpha·G)·(L + beta) with G, L clamped when swiglu_limit is given, so
alpha=1, beta=0, no limit is plain SwiGLU and alpha, beta=1, limit is GPT-OSS's; no geglu and no
separate FC3 on CPU; router_probs must be 2D (x may be 3D). float16 runs on CPU too, but the logits
then enter in float16 (our routers are float32), so only float32 layers are exact. Chained between
other nodes (onnxruntime issue 33866) it gave the right values here (by hand: 1 and 2 threads, all
three graph optimization levels; in the tests: default level, 1 and 2 threads). Anything else (sigmoid/grouped/hash/expert-choice routers, capacity,
exact GELU, non-float32 models) is refused by `refusal()` with the reason, and the layer goes portable.
MoESpec.combine and bias_add only change half-precision rounding: a float32 layer is exact under
either, and a half-precision one is refused anyway (the fused op rounds as it likes).

onnxscript only emits ops it has a schema for: `register_schema()` copies onnxruntime's own schema
(`get_all_operator_schema()`) into onnx.defs once, on first use (no import-time side effects).
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxscript import opset18 as op
from onnxscript import values

from moecc.spec import MoESpec

from . import portable
from .consts import ints, scalar, shape

DOMAIN = "com.microsoft"
ACTIVATION = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu", "swiglu": "swiglu", "swiglu_oai": "swiglu"}
WHY_ACTIVATION = {
    "gelu": "exact (erf) GELU, but the fused op's gelu is the tanh approximation (differs by ~5e-4)",
    "geglu": "geglu is not implemented by onnxruntime's CPU MoE kernel",
    "swiglu_clamp": "a clamped swiglu without GPT-OSS's alpha and +1 has no fused form",
    "swiglu_softcap": "a soft-capped swiglu has no fused form",
    "geglu_tanh": "geglu_tanh (tanh-approximated geglu) is not implemented by onnxruntime's CPU MoE kernel",
}


def refusal(spec: MoESpec, dtype: str = "float32", logits_width: int | None = None) -> str | None:
    """None when com.microsoft::MoE computes exactly this layer, else the reason it does not."""
    r = spec.router
    if dtype != "float32":
        return (f"the layer runs in {dtype}: the fused op would take the router logits in {dtype} (the "
                f"reference routes in float32) and does its own internal precision; only float32 is exact")
    if r.kind not in ("softmax_topk", "topk_softmax"):
        return (f"router {r.kind!r} ({r.describe()}); the fused op only does softmax over all E "
                f"-> top-k [-> renormalize]")
    if r.n_groups > 1:
        return f"group-limited routing (n_groups={r.n_groups}); the fused op picks top-k over all E"
    if r.capacity_factor is not None or getattr(r, "capacity", 0):
        return "expert capacity drops tokens; the fused op is dropless"
    if spec.activation not in ACTIVATION:
        return WHY_ACTIVATION.get(spec.activation, f"activation {spec.activation!r} has no fused equivalent")
    if logits_width is not None and logits_width != spec.num_experts:
        return f"router gives {logits_width} logits for {spec.num_experts} experts"
    return None


def register_schema() -> None:
    """Make com.microsoft::MoE known to onnx.defs (hence onnxscript), from onnxruntime's schema."""
    if onnx.defs.has("MoE", DOMAIN):
        return
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    src = next(s for s in ort_c.get_all_operator_schema() if s.name == "MoE" and s.domain == DOMAIN)
    Schema = onnx.defs.OpSchema
    option = {"Single": Schema.FormalParameterOption.Single, "Optional": Schema.FormalParameterOption.Optional,
              "Variadic": Schema.FormalParameterOption.Variadic}

    def param(p):
        return Schema.FormalParameter(p.name, p.typeStr, p.description, param_option=option[p.option.name])

    def attribute(name, a):
        if a._default_value:   # a serialized AttributeProto
            return Schema.Attribute(name, onnx.AttributeProto.FromString(a._default_value), a.description)
        return Schema.Attribute(name, Schema.AttrType(int(a.type)), a.description, required=a.required)

    onnx.defs.register_schema(Schema(
        src.name, DOMAIN, src.since_version, src.doc,
        inputs=[param(p) for p in src.inputs], outputs=[param(p) for p in src.outputs],
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description) for t in src.type_constraints],
        attributes=[attribute(n, a) for n, a in src.attributes.items()]))


def _interleave(w, spec: MoESpec, trailing: list[int]):
    """[gate; up] rows -> gate/up interleaved row by row (swiglu_fusion=1): w [E, 2F, *trailing]."""
    E, F = spec.num_experts, spec.ffn
    split = op.Reshape(w, ints(E, 2, F, *trailing))              # [E, 2, F, ...]
    perm = [0, 2, 1] + list(range(3, 3 + len(trailing)))
    return op.Reshape(op.Transpose(split, perm=perm), ints(E, 2 * F, *trailing))


def moe(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out, shared_gate,
        token_ids, spec: MoESpec):
    """The layer with com.microsoft::MoE doing the routed experts (caller checked `refusal`)."""
    register_schema()
    msft = values.Opset(DOMAIN, 1)
    xt, T, _ = portable.flat_tokens(x, spec.hidden)                        # [T, H]
    lt = op.Reshape(logits, shape(T, spec.num_experts), allowzero=1)       # [T, E] (T = 0: 0, not 'copy')
    if logits.dtype != ir.DataType.FLOAT:
        lt = op.Cast(lt, to=ir.DataType.FLOAT)
    attrs = dict(k=spec.top_k, activation_type=ACTIVATION[spec.activation],
                 normalize_routing_weights=int(spec.router.kind == "topk_softmax" or spec.router.renormalize))
    if spec.gated:
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
        if spec.activation == "swiglu_oai":
            attrs.update(activation_alpha=spec.act_alpha, activation_beta=1.0, swiglu_limit=spec.act_limit)
        if not spec.interleaved:
            w_in = _interleave(w_in, spec, [spec.hidden])
            b_in = None if b_in is None else _interleave(b_in, spec, [])
    y = msft.MoE(xt, lt, w_in, b_in, w_out, b_out, **attrs)                # [T, H]
    if spec.router.scaling != 1.0:
        y = op.Mul(y, scalar(spec.router.scaling, xt))
    if shared_w_in is not None:
        y = op.Add(y, portable.shared_expert(xt, shared_w_in, shared_w_out, shared_gate, spec))
    return op.Reshape(y, op.Shape(x), allowzero=1)        # a 0 in x's shape is a 0 (no tokens), not 'copy'
