"""Route: set or replace the router of every MoE layer (or the selected ones).

    moe(x, logits, ..., router_bias, ..., token_ids, spec(router=A))  ⇒  moe(x, logits', ..., spec(router=B))
      logits' = logits                                     same width: every router but hierarchical
              = cat([linear(xr, W_G [G, H]), logits], -1)  → hierarchical: a new group router, W_G[g] =
                                                             mean of the expert router rows of group g
              = logits[..., G:]                            hierarchical → a flat router
      router_bias = a new zero correction bias [E]         → sigmoid-topk (unless the layer has one)
      token_ids   = the model's integer input feeding an embedding   → hash

Options (all optional; what is not given is kept): router (CLI spelling `sigmoid-topk` or kind),
top_k, capacity_factor (a number > 0, or "none"/"dropless"), renormalize, scaling, n_groups,
topk_groups, group_score, layers ("all", "every-N", "0,2" = indices among the MoE layers, or layer
names). A change of kind resets n_groups/topk_groups/group_score to their defaults unless given. New tensors live in
the GraphModule's submodule `moecc_route` (get_attr nodes). Bad settings raise MoeccError naming the
layer and the setting.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import fx, nn

from moecc.errors import MoeccError
from moecc.ops import OP_ARGS
from moecc.pipeline import PassResult, attr, delete_attr, moe_nodes, set_spec
from moecc.routing import ROUTER_HELP, check, kind_of, logits_width
from moecc.spec import MoESpec

from .moe_rewrite import select_layers

__all__ = ["ROUTER_HELP", "make", "route_pass"]
GROUP_FIELDS = ("n_groups", "topk_groups", "group_score")
ROUTER_OPTIONS = ("top_k", "capacity_factor", "renormalize", "scaling", "n_groups", "topk_groups", "group_score")
LOGITS, ROUTER_BIAS, TOKEN_IDS = (OP_ARGS.index(n) for n in ("logits", "router_bias", "token_ids"))
HOLDER = "moecc_route"
_CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.alias.default,
          torch.ops.aten.clone.default}
_EMBEDDINGS = {torch.ops.aten.embedding.default, torch.nn.functional.embedding}


def new_spec(spec: MoESpec, options: dict, label: str) -> MoESpec:
    """The layer's spec with the options applied, validated (errors name the layer and setting)."""
    r = spec.router
    changes = {k: options[k] for k in ROUTER_OPTIONS if options.get(k) is not None}
    if "router" in options and options["router"] is not None:
        kind = kind_of(str(options["router"]))
        if kind.replace("_", "-") not in ROUTER_HELP:
            raise MoeccError(f"route: MoE layer {label}: unknown router {options['router']!r}; choose one of "
                             f"{', '.join(ROUTER_HELP)}")
        if kind != r.kind:          # a new kind starts from the default group settings
            defaults = {f.name: f.default for f in dataclasses.fields(r)}
            changes = {**{k: defaults[k] for k in GROUP_FIELDS}, **changes}
        changes["kind"] = kind
    cf = changes.get("capacity_factor")
    if isinstance(cf, str):
        if cf.strip().lower() in ("none", "dropless"):
            changes["capacity_factor"] = None
        else:
            try:
                changes["capacity_factor"] = float(cf)
            except ValueError:
                raise MoeccError(f"route: MoE layer {label}: capacity factor {cf!r} is not a number "
                                 f"(or 'dropless')") from None
    spec = spec.replace(router=dataclasses.replace(r, **changes))
    try:
        check(spec.replace(name=label))
    except MoeccError as e:
        raise MoeccError(f"route: {e}") from None
    return spec


def _label(node: fx.Node, spec: MoESpec) -> str:
    return spec.name or node.name


def _pick(gm: fx.GraphModule, layers) -> list[tuple[fx.Node, MoESpec]]:
    nodes = list(moe_nodes(gm))
    if not nodes:
        raise MoeccError("route: the model has no MoE layer (run upcycle or moefy first, or capture an MoE model)")
    if isinstance(layers, (list, tuple)):
        layers = ",".join(map(str, layers))
    text = (layers or "all").strip()
    if text == "all" or re.fullmatch(r"every-\d+|[\d,\s]+", text):
        return [nodes[i] for i in select_layers(text, len(nodes), "MoE layer")]
    by_name = {_label(n, s): (n, s) for n, s in nodes}
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise MoeccError(f"route: no MoE layer named {missing[0]!r}; the layers are {', '.join(by_name)}")
    return [by_name[w] for w in wanted]


def _holder(gm: fx.GraphModule) -> nn.Module:
    if not hasattr(gm, HOLDER):
        gm.add_submodule(HOLDER, nn.Module())
    return getattr(gm, HOLDER)


def _fake_mode(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


def _add_tensor(gm: fx.GraphModule, before: fx.Node, label: str, what: str, t: torch.Tensor,
                trainable: bool) -> fx.Node:
    holder, name = _holder(gm), re.sub(r"\W", "_", f"{label}_{what}")
    while hasattr(holder, name):
        name += "_"
    if trainable:
        holder.register_parameter(name, nn.Parameter(t))
    else:
        holder.register_buffer(name, t)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{HOLDER}.{name}")
    mode = _fake_mode(gm)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(t)
    return node


def _call(gm: fx.GraphModule, before: fx.Node, target, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args)
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    vals = [[v.meta.get("val") for v in a] if isinstance(a, (list, tuple)) else a for a in vals]
    mode = _fake_mode(gm)
    if mode is not None and all(v is not None for v in vals):
        with mode:
            node.meta["val"] = target(*vals)
    return node


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    return attr(gm, node.target).detach()


def _expert_logits(gm: fx.GraphModule, node: fx.Node, old: MoESpec) -> fx.Node:
    """The [.., E] expert logits feeding the node (slicing off the group columns of hierarchical)."""
    logits = node.args[LOGITS]
    if old.router.kind != "hierarchical":
        return logits
    if logits.target is torch.ops.aten.cat.default and len(logits.args[0]) == 2:
        return logits.args[0][1]                         # a cat this pass made: [groups, experts]
    G, E = old.router.n_groups, old.num_experts
    return _call(gm, node, torch.ops.aten.slice.Tensor, (logits, -1, G, G + E))


def _group_logits(gm: fx.GraphModule, node: fx.Node, expert_logits: fx.Node, spec: MoESpec, label: str) -> fx.Node:
    lin = expert_logits
    while lin.op == "call_function" and lin.target in _CASTS:
        lin = lin.args[0]
    w = _param(gm, lin.args[1]) if lin.target is torch.ops.aten.linear.default else None
    if w is None or w.shape[0] != spec.num_experts:
        raise MoeccError(f"route: MoE layer {label}: hierarchical routing needs a group router, and the "
                         f"layer's logits are not a Linear of its input to initialize one from")
    G = spec.router.n_groups
    wg = _add_tensor(gm, node, label, "group_router_weight", w.reshape(G, -1, w.shape[1]).mean(1).clone(), True)
    args = (lin.args[0], wg)
    b = _param(gm, lin.args[2]) if len(lin.args) > 2 and lin.args[2] is not None else None
    if b is not None:
        args += (_add_tensor(gm, node, label, "group_router_bias", b.reshape(G, -1).mean(1).clone(), True),)
    return _call(gm, node, torch.ops.aten.linear.default, args)


def token_ids_input(gm: fx.GraphModule) -> fx.Node | None:
    """The integer placeholder that feeds an embedding (the model's token ids), if any."""
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            continue
        for u in p.users:
            if u.op == "call_function" and u.target in _EMBEDDINGS and len(u.args) > 1 and u.args[1] is p:
                return p
            if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Embedding):
                return p
    return None


def _set_arg(node: fx.Node, index: int, value) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


def _drop_unused_tensors(gm: fx.GraphModule, used_before: set[str]) -> int:
    """Delete the parameters/buffers this pass stopped reading (and route's own unread ones)."""
    now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    gone = (used_before | _holder_tensors(gm)) - now
    for target in gone:
        delete_attr(gm, target)
    return len(gone)


def _used_tensors(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}


def _holder_tensors(gm: fx.GraphModule) -> set[str]:
    holder = getattr(gm, HOLDER, None)
    if holder is None:
        return set()
    return {f"{HOLDER}.{k}" for k, _ in (*holder.named_parameters(), *holder.named_buffers())}


def route_pass(gm: fx.GraphModule, options: dict) -> PassResult:
    chosen = _pick(gm, options.get("layers"))
    used_before, held_before = _used_tensors(gm), _holder_tensors(gm)
    stats = {"moe_layers": sum(1 for _ in moe_nodes(gm)), "rerouted": 0, "tensors_added": 0,
             "tensors_removed": 0, "token_ids_wired": 0}
    for node, old in chosen:
        label = _label(node, old)
        spec = new_spec(old, options, label)
        if spec == old:
            continue
        kind = spec.router.kind
        if logits_width(spec) != logits_width(old) or (kind == "hierarchical") != (old.router.kind == "hierarchical"):
            logits = _expert_logits(gm, node, old)
            if kind == "hierarchical":
                groups = _group_logits(gm, node, logits, spec, label)
                logits = _call(gm, node, torch.ops.aten.cat.default, ([groups, logits], -1))
            _set_arg(node, LOGITS, logits)
        if kind == "sigmoid_topk" and node.args[ROUTER_BIAS] is None:
            bias = _add_tensor(gm, node, label, "correction_bias", torch.zeros(spec.num_experts), False)
            _set_arg(node, ROUTER_BIAS, bias)
        elif kind != "sigmoid_topk" and node.args[ROUTER_BIAS] is not None:
            _set_arg(node, ROUTER_BIAS, None)
        if kind == "hash" and node.args[TOKEN_IDS] is None:
            ids = token_ids_input(gm)
            if ids is None:
                raise MoeccError(f"route: MoE layer {label}: hash routing needs token ids; the model input "
                                 f"has none (no integer input feeds an embedding)")
            _set_arg(node, TOKEN_IDS, ids)
            stats["token_ids_wired"] += 1
        set_spec(node, spec)
        stats["rerouted"] += 1
    gm.graph.eliminate_dead_code()
    stats["tensors_removed"] = _drop_unused_tensors(gm, used_before)
    stats["tensors_added"] = len(_holder_tensors(gm) - held_before)
    gm.recompile()
    return PassResult(gm, stats["rerouted"] > 0, stats)


def make(options: dict):
    """Options as in the module docstring; other keys (the CLI's common options) are ignored."""
    opts = dict(options)
    return lambda gm: route_pass(gm, opts)
