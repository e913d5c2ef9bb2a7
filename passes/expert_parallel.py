"""Expert parallel: each experts layer computed by the ranks holding its experts.

    experts(x, ids, weights, w_in [E,R,H], w_out, b_in, b_out)
      ⇒ EPExperts(x, ids, weights): dispatch → all-to-all → experts(local w_in [E_r,R,H], ...) →
        all-to-all → combine                                       (moecc.distributed.ep, per rank)

    plan(gm, {"ep": N, "placement": "placement.json" | Plan | None, "capacity_scope": "rank"})
        -> EPPlan (frozen, JSON: ep.json in the artifact)
    apply(gm, plan, group)   at launch, on each rank: the rewrite above; the full expert weights
                             are deleted from the module, each rank keeps only the experts it holds.
                             The layer becomes two nodes: h = EPExperts(x, ids, weights) (split
                             sizes agreed, dispatches in flight) where the experts node was, and
                             y = ep_finish(h) right before y's first user, so the ops in between
                             (the shared expert: independent of the exchanged tokens) run while
                             the first dispatch is in flight

Plans every MoE layer of the graph, in graph order: `torch.ops.moecc.moe` nodes (upcycled, moefied,
recognized layers: routing inside) and `torch.ops.moecc.experts` nodes (the experts level: transformers
families through the ExpertsInterface, models written with moecc.ops.call_experts). `apply` works on
the experts level: the torch backend's program (moecc.decompose: a moe node ⇒ routing ATen ops + one
experts node + the shared expert as ATen ops, in the same order), so the plan's layer i is the
program's i-th experts node (its spec name checked); `parallelize(captured, plan, group)` decomposes a
captured graph and applies (the Python API, e.g. for training). The shared expert and the router stay
ordinary ops, replicated: each rank runs them on its own tokens.
Placement: placement.json (`moecc plan`), checked against the model (layers, experts, devices = N) up
front; contiguous (expert e on rank e·N/E) when none is given.

Capacity and expert choice: the route ops run on each rank's own tokens before the dispatch, so
their scope is the rank's batch (capacity C from the rank's T; expert e takes its top tokens among
the rank's). That is the only scope honoured: "global" (one capacity over all ranks' tokens) needs the
router logits of every rank before routing and is refused with that reason.

At compile time (the registered pass) the graph is checked and planned, not rewritten: no process
group exists then, and the artifact stays one model that runs on 1 or N ranks (the launcher applies the
plan to the artifact's decomposed program on each rank: moecc.distributed.launch).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from moecc.errors import MoeccError
from moecc.ops import EXPERTS_ARGS, OP_ARGS, parse_spec
from moecc.pipeline import PassResult

__all__ = ["EPLayer", "EPPlan", "apply", "experts_nodes", "layer_nodes", "make", "parallelize", "plan"]
log = logging.getLogger("moecc.passes.expert_parallel")
EXPERTS_OP = torch.ops.moecc.experts.default
MOE_OP = torch.ops.moecc.moe.default
ARGS = {EXPERTS_OP: {n: i for i, n in enumerate(EXPERTS_ARGS)}, MOE_OP: {n: i for i, n in enumerate(OP_ARGS)}}
WEIGHTS = ("w_in", "w_out", "b_in", "b_out")
FORMAT = "moecc.ep/1"
GRAPH_META = "moecc.ep"          # gm.meta key: the plan's JSON (the artifact writes it as ep.json)


@dataclass(frozen=True)
class EPLayer:
    node: str                    # the layer's node in the planned graph (moe or experts node)
    name: str                    # the MoE layer (spec.name, placement.json's layer name)
    num_experts: int
    share: tuple                 # [E][W] fraction of expert e's tokens on rank w
    local: tuple = ()            # node-local experts
    devices_per_node: int = 1
    scope: str = "none"          # capacity / expert-choice scope: "rank", or "none" (dropless top-k)

    def placement(self):
        from moecc.distributed.layout import LayerPlacement
        E = self.num_experts
        local = np.zeros(E, bool)
        local[list(self.local)] = True
        return LayerPlacement(self.name, np.asarray(self.share, float), local, self.devices_per_node)


@dataclass(frozen=True)
class EPPlan:
    world: int
    method: str                  # "contiguous" or placement.json's method
    layers: tuple[EPLayer, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"format": FORMAT, "world": self.world, "method": self.method,
                "layers": [{**l.__dict__, "share": [list(r) for r in l.share], "local": list(l.local)}
                           for l in self.layers]}

    @staticmethod
    def from_json(doc: dict) -> "EPPlan":
        if doc.get("format") != FORMAT:
            raise MoeccError(f"expert parallel: plan format {doc.get('format')!r}, expected {FORMAT!r}")
        layers = tuple(EPLayer(**{**l, "share": tuple(tuple(r) for r in l["share"]),
                                  "local": tuple(l["local"])}) for l in doc["layers"])
        return EPPlan(int(doc["world"]), doc["method"], layers)

    def held(self, rank: int) -> list[list[int]]:
        return [l.placement().held(rank) for l in self.layers]


def experts_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is EXPERTS_OP]


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The MoE layers in graph order: moe nodes and experts nodes (one per layer either way)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ARGS]


def _arg(node: fx.Node, name: str):
    i = ARGS[node.target][name]
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def _tensor(gm: fx.GraphModule, node: fx.Node, name: str):
    a = _arg(node, name)
    if a is None:
        return None
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        raise MoeccError(f"expert parallel: layer {node.name}: {name} is computed in the graph "
                         f"({getattr(a, 'op', type(a).__name__)}), not a parameter; only stored expert "
                         "weights can be split over ranks")
    return _get(gm, a.target)


def _get(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _scope(spec, wanted: str) -> str:
    r = spec.router
    what = ("expert-choice routing" if r.kind == "expert_choice" else
            "capacity" if (r.capacity_factor is not None or r.capacity) else None)
    if what is None:
        return "none"
    if wanted != "rank":
        raise MoeccError(
            f"expert parallel: layer {spec.name or '?'}: {what} with scope {wanted!r} cannot be "
            "honoured: the route ops run on each rank's own tokens before the dispatch, so capacity "
            "and expert choice see the rank's batch; a global scope needs every rank's router logits "
            "before routing. Use capacity_scope='rank' (each rank's batch is its own capacity window)")
    log.info("expert parallel: layer %s: %s is rank-local (each rank routes its own tokens)",
             spec.name, what)
    return "rank"


def plan(gm: fx.GraphModule, cfg: dict) -> EPPlan:
    """The expert-parallel plan of every experts node (checks the graph and the placement)."""
    from moecc.distributed.layout import LayerPlacement
    from moecc.passes.placement import Plan, load_plan

    world = int(cfg.get("ep") or 0)
    if world < 1:
        raise MoeccError(f"expert parallel: ep must be a number of ranks >= 1, got {cfg.get('ep')!r}")
    nodes = layer_nodes(gm)
    if not nodes:
        raise MoeccError("expert parallel: the graph has no MoE layer to split (no torch.ops.moecc.moe "
                         "or torch.ops.moecc.experts node): make one first (--upcycle, --moefy) or "
                         "capture an MoE model")
    pl = cfg.get("placement")
    if pl is not None and not isinstance(pl, Plan):
        pl = load_plan(pl)
    if pl is not None:
        if pl.topology.devices != world:
            raise MoeccError(f"expert parallel: placement.json places experts on {pl.topology.devices} "
                             f"devices but --ep is {world}; plan with a topology of {world} devices")
        if len(pl.layers) != len(nodes):
            raise MoeccError(f"expert parallel: placement.json has {len(pl.layers)} layers, the model "
                             f"{len(nodes)} MoE layers: it is for another model")
    layers = []
    for i, node in enumerate(nodes):
        spec = parse_spec(_arg(node, "spec"))
        w_in = _tensor(gm, node, "w_in")
        for name in WEIGHTS[1:]:
            _tensor(gm, node, name)
        E = int(w_in.shape[0])
        scope = _scope(spec, str(cfg.get("capacity_scope", "rank")))
        if pl is None:
            lp = LayerPlacement.contiguous(spec.name or node.name, E, world)
        else:
            lp = LayerPlacement.from_plan(pl, i)
            if lp.num_experts != E:
                raise MoeccError(f"expert parallel: placement.json layer {lp.name} has {lp.num_experts} "
                                 f"experts, the model's layer {spec.name or node.name} has {E}: it is "
                                 "for another model")
            if spec.name and lp.name != spec.name:
                raise MoeccError(f"expert parallel: placement.json's layer {i} is {lp.name!r}, the "
                                 f"model's is {spec.name!r}: it is for another model")
        layers.append(EPLayer(node.name, lp.name, E, tuple(map(tuple, lp.share.tolist())),
                              tuple(np.flatnonzero(lp.local).tolist()), lp.devices_per_node, scope))
    return EPPlan(world, "contiguous" if pl is None else pl.method, tuple(layers))


def _match(gm: fx.GraphModule, p: EPPlan) -> list[fx.Node]:
    """The plan's layers ⇒ the graph's experts nodes, by position (a decomposed program renames its
    nodes), each checked by its spec's layer name and expert count."""
    nodes = experts_nodes(gm)
    if any(n.target is MOE_OP for n in layer_nodes(gm)):
        raise MoeccError("expert parallel: the graph still has torch.ops.moecc.moe nodes; apply works on "
                         "the decomposed program (the torch artifact's, or parallelize(captured, ...))")
    if len(nodes) != len(p.layers):
        raise MoeccError(f"expert parallel: the plan has {len(p.layers)} layers, the graph "
                         f"{len(nodes)} experts nodes: the plan is for another model")
    for node, layer in zip(nodes, p.layers):
        spec = parse_spec(_arg(node, "spec"))
        E = int(_tensor(gm, node, "w_in").shape[0])
        if (spec.name and spec.name != layer.name) or E != layer.num_experts:
            raise MoeccError(f"expert parallel: the plan's layer {layer.name} ({layer.num_experts} "
                             f"experts) meets the graph's {spec.name or node.name} ({E} experts): the "
                             "plan is for another model")
    return nodes


def apply(gm: fx.GraphModule, p: EPPlan, group=None) -> fx.GraphModule:
    """Rewrite each planned experts node into an EPExperts module call on this rank (see the
    module docstring); the layer's full weights leave the module."""
    import torch.distributed as dist

    from moecc.distributed.module import EPExperts, EPState, ep_finish

    rank = dist.get_rank(group)
    if dist.get_world_size(group) != p.world:
        raise MoeccError(f"expert parallel: the plan is for {p.world} ranks, the process group has "
                         f"{dist.get_world_size(group)}")
    nodes = _match(gm, p)
    state = EPState(group, any(l.local for l in p.layers))
    dead = set()
    for i, (node, layer) in enumerate(zip(nodes, p.layers)):
        placement = layer.placement()
        held = placement.held(rank)
        local = {n: (None if (t := _tensor(gm, node, n)) is None else t.detach()[held].clone())
                 for n in WEIGHTS}
        mod = EPExperts(local, _arg(node, "spec"), _arg(node, "kernel") or "reference", placement,
                        i, state)
        target = f"moecc_ep_{i}"
        gm.add_module(target, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (_arg(node, "x"), _arg(node, "ids"), _arg(node, "weights")))
        new.meta = {k: v for k, v in node.meta.items() if k != "val"}
        first = _first_user(gm, node)
        if first is not None and not state.carry_node:
            mod.split = True                     # issue here; finish right before y's first use:
            with gm.graph.inserting_before(first):     # the ops between fill the dispatch wait
                fin = gm.graph.call_function(ep_finish, (new,))
        else:
            with gm.graph.inserting_after(new):
                fin = gm.graph.call_function(ep_finish, (new,))
        fin.meta = dict(node.meta)
        node.replace_all_uses_with(fin)
        dead.update(a.target for n in WEIGHTS if isinstance(a := _arg(node, n), fx.Node))
        gm.graph.erase_node(node)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target in dead and not n.users:
            gm.graph.erase_node(n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in dead - used:
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if hasattr(mod, attr):
            delattr(mod, attr)
    gm.graph.lint()
    gm.recompile()
    return gm


def _first_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The user of `node` that comes first in graph order."""
    if not node.users:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def decomposed(captured) -> fx.GraphModule:
    """A captured model's graph at the experts level, as the torch backend lowers it: exported,
    moecc.decompose (moe ⇒ routing ATen ops + experts node + shared expert), unlifted (trainable
    parameters, the captured module's names)."""
    from moecc.decompose import decompose
    from moecc.frontend import _drop_guards

    gm = decompose(captured.export()).module()
    _drop_guards(gm)
    return gm


def parallelize(captured, p: EPPlan | None = None, group=None) -> fx.GraphModule:
    """The Python API for expert parallel (inference or training) on each rank: the captured model
    decomposed (`decomposed`), each experts layer split as `p` says (default: the plan the
    expert_parallel pass left on the graph) with `apply`. Non-expert parameters stay replicated:
    for training, all-reduce their gradients over the group as data parallel does."""
    if p is None:
        doc = captured.gm.meta.get(GRAPH_META)
        if doc is None:
            raise MoeccError("expert parallel: no plan: run the expert_parallel pass first "
                             "(moecc.transform(captured, [(\"expert_parallel\", {\"ep\": N})])) or pass one")
        p = EPPlan.from_json(doc)
    return apply(decomposed(captured), p, group)


def make(options: dict):
    cfg = {k: options.get(k) for k in ("ep", "placement", "capacity_scope") if options.get(k) is not None}

    def expert_parallel(gm: fx.GraphModule) -> PassResult:
        p = plan(gm, cfg)
        gm.meta[GRAPH_META] = p.to_json()
        for node, layer in zip(layer_nodes(gm), p.layers):
            node.meta["moecc.ep"] = {"world": p.world, "held": [layer.placement().held(r)
                                                                for r in range(p.world)],
                                     "scope": layer.scope}
        log.info("expert parallel: %d layers over %d ranks (%s)", len(p.layers), p.world, p.method)
        return PassResult(gm, False, {"ep_layers": len(p.layers), "ep_world": p.world})
    return expert_parallel


def dumps(p: EPPlan) -> str:
    return json.dumps(p.to_json(), indent=1)

