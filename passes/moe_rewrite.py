"""Shared by the FFN → MoE passes (upcycle, moefy): layer selection, parameter reads, the rewrite.

    FFNMatch nodes  ⇒  logits = linear(x, router_w [L, H]);  y = moecc::moe(x, logits, w_in, w_out, ...)

New weights live in a submodule `moecc_<i>` of the GraphModule (get_attr nodes); the FFN's old
parameters are removed when nothing else uses them.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from moecc.errors import MoeccError
from moecc.pipeline import MOE_OP, SPEC_KEY, attr, delete_attr, set_spec
from moecc.spec import MoESpec

from .ffn_match import FFNMatch


def select_layers(layers: str | None, count: int, what: str = "FFN") -> list[int]:
    """'all' | 'every-N' (layers N-1, 2N-1, ...) | '0,2,5' -> sorted indices into the FFN list."""
    layers = (layers or "all").strip()
    if layers == "all":
        return list(range(count))
    if layers.startswith("every-"):
        try:
            n = int(layers[len("every-"):])
        except ValueError:
            n = 0
        if n < 1:
            raise MoeccError(f"--layers {layers!r}: use every-N with N ≥ 1, e.g. every-2")
        return [i for i in range(count) if i % n == n - 1]
    try:
        picked = sorted({int(p) for p in layers.split(",") if p.strip()})
    except ValueError:
        raise MoeccError(f"--layers {layers!r}: use all, every-N, or a list like 0,2,5") from None
    bad = [i for i in picked if not 0 <= i < count]
    if bad:
        raise MoeccError(f"--layers {layers!r}: the model has {count} {what}s (0..{count - 1}); "
                         f"no layer {bad[0]}")
    return picked


def param(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor behind a get_attr node (detached), or None."""
    if node is None:
        return None
    return attr(gm, node.target).detach()


def _fake_val(x: fx.Node, fn, *tensors):
    val = x.meta.get("val")
    if val is None or not hasattr(val, "fake_mode"):
        return None
    mode = val.fake_mode
    with mode:
        return fn(val, *[mode.from_tensor(t) for t in tensors])


def replace_ffn(gm: fx.GraphModule, match: FFNMatch, index: int, spec: MoESpec,
                tensors: dict[str, torch.Tensor | None]) -> fx.Node:
    """Replace one matched FFN by router Linear + moecc::moe. `tensors`: router, w_in, w_out and
    optional b_in, b_out, shared_w_in, shared_w_out, shared_gate."""
    holder = nn.Module()
    for key, t in tensors.items():
        if t is not None:
            holder.register_parameter(key, nn.Parameter(t.contiguous(), requires_grad=t.is_floating_point()))
    name = f"moecc_{index}"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, holder)
    graph, out = gm.graph, match.output
    with graph.inserting_before(match.nodes[0]):
        attrs = {k: graph.get_attr(f"{name}.{k}") if tensors.get(k) is not None else None
                 for k in ("router", "w_in", "w_out", "b_in", "b_out", "shared_w_in", "shared_w_out",
                           "shared_gate")}
    with graph.inserting_before(out):
        logits = graph.call_function(torch.ops.aten.linear.default, (match.x, attrs["router"]))
        moe = graph.call_function(MOE_OP, (
            match.x, logits, attrs["w_in"], attrs["w_out"], attrs["b_in"], attrs["b_out"], None,
            attrs["shared_w_in"], attrs["shared_w_out"], attrs["shared_gate"], None, "", "reference"))
    for k, node in attrs.items():
        if node is not None:
            node.meta["val"] = _fake_val(match.x, lambda v, t: t, tensors[k])
    logits.meta["val"] = _fake_val(match.x, torch.nn.functional.linear, tensors["router"])
    moe.meta.update({k: out.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in out.meta})
    set_spec(moe, spec)
    out.replace_all_uses_with(moe)
    old_params = {n for n in (*match.w_in, *match.b_in, match.w_out, match.b_out) if n is not None}
    for node in reversed(match.nodes):
        graph.erase_node(node)
    for node in old_params:
        if not node.users:
            target = node.target
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                delete_attr(gm, target)
    assert moe.meta[SPEC_KEY] == spec
    return moe
