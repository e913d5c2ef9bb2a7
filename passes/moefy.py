"""MoEfication: every dense FFN is split into E disjoint groups of its neurons, routed top-k, no training.

    Linear(W1, b1) → act → Linear(W2, b2)   ⇒  moe(topk_unit: E experts = slices of W1 rows / W2 columns)
    (act(x·Wg) ⊙ x·Wu)·Wd                    ⇒  moe(E gated experts, w_in = [Wg rows; Wu rows] of each slice)

    plan:  calibration → FFN inputs x [T, H] → hidden a [T, F] → neuron groups (moefy_partition)
           → per-expert drop error [T, E] → router fit (moefy_router)
    apply: for a top-k, refit the output rows and biases to the router's choices (moefy_refit), write
           the experts, router and biases; `replace_ffn` puts in the MoE node.

Each chosen expert is weighted 1 (router kind `topk_unit`), so with all experts on the MoE is the dense
FFN (up to float summation order). Choices made here, and why:
- E must divide F: when it does not, the groups differ by one neuron and the short ones are padded
  with zero neurons (zero rows/columns/biases: act(0)·0 = 0, exact); stats["padded_neurons"] says so.
- shared: the `shared` most active neurons (mean |contribution| to the output), rounded up to whole
  experts, form experts the router always picks (router bias ALWAYS_ON); they count within top-k.
- the router predicts each expert's drop error ‖contribution_e − its mean‖, so top-k keeps the experts
  whose absence would change the output most.
- refit (k < E): the kept experts' output rows and biases are refit by ridge least squares to the dense
  FFN's output, given the router's top-k on calibration tokens (moefy_refit): what the dropped neurons
  contributed is partly predictable from those that ran. On MiniLM it cuts the held-out FFN error by
  about a third and raises the embedding cosine from 0.76 to 0.86 (E=8, k=2) and 0.83 to 0.89 (E=32, k=8).
  refit=False fits the expert biases only (the mean contribution of the dropped experts given the
  router's choice). Refitting each layer on the inputs of the already-MoEfied layers before it was
  measured too and gained < 0.003 cosine: the plan's dense-model inputs are used.
Facts for the artifact (partition method, router and its held-out recall, calibration size and sha256,
active fraction, held-out FFN error at this k: mean ‖MoE − dense‖/‖dense‖ of the FFN output on calibration
tokens the router was not fitted on) are on each MoE node's `node.meta["moecc.moefy"]`;
`moefy_facts(gm)` collects them by layer name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from moecc import calibration as calib
from moecc.errors import MoeccError
from moecc.ops import activate
from moecc.pipeline import PassResult, moe_nodes
from moecc.spec import MoESpec, RouterSpec

from . import moefy_heal, moefy_partition, moefy_refit, moefy_router
from .ffn_match import FFNMatch, find_ffns
from .moe_rewrite import _fake_val, param, replace_ffn, select_layers
from .upcycle import check_experts, no_ffn_error

FACTS_KEY = "moecc.moefy"
ALWAYS_ON = 1.0e4            # router logit of a shared (always-on) expert
VALIDATE_EVERY = 10          # every 10th calibration token scores the router and the refit; the rest fit them


@dataclass
class LayerPlan:
    index: int                       # into find_ffns' matches
    name: str
    groups: list                     # E tensors of real neuron indices (shared experts first)
    width: int                       # m: neurons per expert after padding
    shared: int                      # j: always-on experts
    router: dict                     # fitted on the E - j routed experts
    facts: dict
    weights: tuple                   # the dense FFN in float: (w_in list, b_in list, w_out, b_out)
    activation: str
    x: torch.Tensor                  # [T, H] calibration inputs of this FFN (dense model)
    val: torch.Tensor                # [T] bool: tokens the router and the refit were not fitted on
    refits: dict = field(default_factory=dict)   # (top_k, full) -> (w_a [F, H], d [E, H], facts), on x


def _weights(gm: fx.GraphModule, m: FFNMatch):
    """(w_in rows [R, H] as a list per input Linear, b_in list, w_out [H, F], b_out [H]), float."""
    w_in = [param(gm, w).float() for w in m.w_in]
    b_in = [param(gm, b).float() if b is not None else torch.zeros(w.shape[0]) for b, w in zip(m.b_in, w_in)]
    w_out = param(gm, m.w_out).float()
    b_out = param(gm, m.b_out).float() if m.b_out is not None else torch.zeros(w_out.shape[0])
    return w_in, b_in, w_out, b_out


def _hidden(x, w_in, b_in, activation: str) -> torch.Tensor:
    """x [T, H] -> a [T, F]: the FFN's hidden activation (gated: act(gate) · up)."""
    spec = MoESpec(num_experts=1, hidden=x.shape[1], ffn=w_in[-1].shape[0], activation=activation)
    return activate(torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(w_in, b_in)], -1), spec)


def plan_layer(gm, m: FFNMatch, index: int, x: torch.Tensor, num_experts: int, method: str, shared: int,
               router: str, seed: int) -> LayerPlan:
    weights = _weights(gm, m)
    w_in, b_in, w_out, _ = weights
    F_, E = w_out.shape[1], num_experts
    width = math.ceil(F_ / E)
    j = math.ceil(shared / width) if shared > 0 else 0
    if j >= E:
        raise MoeccError(f"layer {m.name}: --shared {shared} neurons fill {j} of the E={E} experts; "
                         "leave at least one expert to route")
    x = x.float()
    a = _hidden(x, w_in, b_in, m.activation)                                # [T, F]
    importance = a.abs().mean(0) * w_out.norm(dim=0)                        # [F] mean |contribution|
    keep = torch.argsort(importance, descending=True)
    shared_idx, rest = keep[:j * width].sort().values, keep[j * width:].sort().values
    rows = torch.cat(w_in, dim=1)[rest] if len(w_in) > 1 else w_in[0][rest]  # [F', D] per neuron
    deviation = (a[:, rest] - a[:, rest].mean(0)).abs()                    # [T, F'] what dropping costs
    labels = moefy_partition.partition(method, E - j, rows=rows, active=deviation, seed=seed)
    routed = [rest[g] for g in moefy_partition.groups_of(labels, E - j)]
    groups = [shared_idx[i * width:(i + 1) * width] for i in range(j)] + routed
    error = []
    for idx in routed:                                                      # [T, H] each
        c = a[:, idx] @ w_out[:, idx].t()
        error.append((c - c.mean(0)).norm(dim=1))
    y = torch.stack(error, 1)                                               # [T, Er] drop error
    y = y / y.mean().clamp(min=1e-12)
    val = torch.arange(x.shape[0]) % VALIDATE_EVERY == 0
    fitted = moefy_router.fit(router, x[~val], y[~val], seed)
    pred = moefy_router.predict(fitted, x)                                  # [T, Er]
    facts = {"method": method, "router": router, "experts": E, "shared_experts": j,
             "shared_neurons": int(shared_idx.numel()), "width": width, "padded_neurons": E * width - F_,
             "router_recall": round(moefy_router.recall(pred[val], y[val]), 4),
             "random_recall": round(moefy_router.random_recall(y[val], seed), 4)}
    return LayerPlan(index, m.name, groups, width, j, fitted, facts, weights, m.activation, x, val)


def layer_refit(p: LayerPlan, k: int, full: bool = True):
    """(w_a [F, H], d [E, H], facts) for top-k, fitted on the plan's calibration tokens (cached).
    k = E: every expert on, the dense FFN's own weights (b_out on expert 0), nothing to fit."""
    key = (k, full)
    if key not in p.refits:
        w_in, b_in, w_out, b_out = p.weights
        if k >= len(p.groups):
            d = torch.zeros(len(p.groups), w_out.shape[0])
            d[0] = b_out
            p.refits[key] = w_out.t().contiguous(), d, {"val_error": 0.0}
        else:
            a = _hidden(p.x, w_in, b_in, p.activation)
            chosen = moefy_refit.chosen_mask(moefy_router.predict(p.router, p.x).float(), p.shared, k)
            owner = moefy_refit.expert_of(p.groups, w_out.shape[1])
            p.refits[key] = moefy_refit.refit(a, chosen, owner, w_out, b_out, ~p.val, p.val, full=full)
    return p.refits[key]


def held_out_error(p: LayerPlan, k: int, refit: bool = True) -> float:
    """Mean relative error of the FFN output on held-out calibration tokens at top-k (k = E: 0, exact)."""
    return layer_refit(p, k, full=refit)[2]["val_error"]


def plan(gm: fx.GraphModule, num_experts: int = 8, layers: str = "all", method: str = "cluster",
         shared: int = 0, router: str = "linear", calibration=None, tokenize=None, seed: int = 0,
         progress=None) -> tuple[list[LayerPlan], dict]:
    """The k-independent part of moefy: partitions, routers, compensation tables; and pass stats."""
    check_experts(num_experts, 1)
    if method not in moefy_partition.METHODS:
        raise MoeccError(f"moefy --method {method!r}: choose one of {', '.join(moefy_partition.METHODS)}")
    if router not in moefy_router.ROUTERS:
        raise MoeccError(f"moefy --router {router!r}: choose one of {', '.join(moefy_router.ROUTERS)}")
    if shared < 0:
        raise MoeccError(f"moefy --shared must be ≥ 0 neurons, got {shared}")
    matches, refusals = find_ffns(gm)
    if not matches:
        raise no_ffn_error(refusals)
    if calibration is None:
        raise MoeccError("moefy fits its routers on data: pass --calibration FILE (text, one example "
                         "per line, or a .pt/.npz of input tensors)")
    cal = calib.load(calibration, tokenize)
    calib.require_tokens(cal, num_experts)
    chosen = select_layers(layers, len(matches))
    xs = calib.collect(gm, [matches[i].x for i in chosen], cal)
    plans = []
    for i, x in zip(chosen, xs):
        plans.append(plan_layer(gm, matches[i], i, x, num_experts, method, shared, router, seed))
        plans[-1].facts["calibration"] = cal.facts()
        if progress is not None:
            progress(matches[i].name)
    stats = {"ffn_found": len(matches), "ffn_rewritten": len(chosen), "refused": len(refusals),
             "calibration_examples": cal.examples, "calibration_tokens": cal.tokens,
             "padded_neurons": sum(p.facts["padded_neurons"] for p in plans),
             "shared_neurons": sum(p.facts["shared_neurons"] for p in plans)}
    return plans, stats


def _expert_tensors(gm, m: FFNMatch, p: LayerPlan, w_a: torch.Tensor, d: torch.Tensor) -> dict:
    """The MoE's tensors: experts = padded neuron groups, output rows w_a [F, H], output biases d [E, H]."""
    w_in, b_in, _, _ = p.weights
    E, width, H = len(p.groups), p.width, w_a.shape[1]
    dtype = param(gm, m.w_out).dtype

    def pad(idx):                                                           # [m] indices, -1 = zero neuron
        return torch.cat([idx, idx.new_full((width - idx.numel(),), -1)])

    def take(t, idx, dim):                                                  # t with a zero slice appended
        zero = torch.zeros_like(t.narrow(dim, 0, 1))
        return torch.cat([t, zero], dim).index_select(dim, torch.where(idx < 0, t.shape[dim], idx))

    cols = [pad(g) for g in p.groups]
    t_in = torch.stack([torch.cat([take(w, c, 0) for w in w_in]) for c in cols])       # [E, R, H]
    t_bin = torch.stack([torch.cat([take(b, c, 0) for b in b_in]) for c in cols])      # [E, R]
    t_out = torch.stack([take(w_a, c, 0).t() for c in cols])                           # [E, H, m]
    r = {key: v.float() for key, v in p.router.items()}
    last_w, last_b = ("weight", "bias") if "weight" in r else ("w2", "b2")
    r[last_w] = torch.cat([torch.zeros(p.shared, r[last_w].shape[1]), r[last_w]])      # [E, ·]
    r[last_b] = torch.cat([torch.full((p.shared,), ALWAYS_ON), r[last_b]])
    t = {"router": r[last_w], "router_bias": r[last_b], "w_in": t_in, "w_out": t_out,
         "b_in": t_bin, "b_out": d}
    if "w1" in r:   # replace_ffn writes linear(x, router [E, H]); _router_nodes puts W2 in its place
        t.update(router=torch.zeros(len(p.groups), H), router_w1=r["w1"], router_b1=r["b1"],
                 router_w2=r[last_w])
    return {key: v.to(dtype) for key, v in t.items()}


def _router_nodes(gm: fx.GraphModule, moe: fx.Node, t: dict) -> None:
    """replace_ffn wrote logits = linear(x, router): add the bias, and the MLP's first layer."""
    logits, name = moe.args[1], moe.args[2].target.rsplit(".", 1)[0]
    x, graph, holder = logits.args[0], gm.graph, gm.get_submodule(name)
    with graph.inserting_before(logits):
        attr = {k: graph.get_attr(f"{name}.{k}") for k in t if k.startswith("router_") and k != "router_w2"}
        for k, node in attr.items():
            node.meta["val"] = _fake_val(x, lambda v, w: w, t[k])
        inp = x
        if "router_w1" in attr:
            h = graph.call_function(torch.ops.aten.linear.default, (x, attr["router_w1"], attr["router_b1"]))
            inp = graph.call_function(torch.ops.aten.relu.default, (h,))
            h.meta["val"] = _fake_val(x, torch.nn.functional.linear, t["router_w1"], t["router_b1"])
            inp.meta["val"] = _fake_val(h, torch.relu)
            holder.router = torch.nn.Parameter(t["router_w2"].contiguous())        # [E, M]
            delattr(holder, "router_w2")
            logits.args[1].meta["val"] = _fake_val(x, lambda v, w: w, t["router_w2"])
    logits.args = (inp, logits.args[1], attr["router_bias"])
    logits.meta["val"] = _fake_val(inp, torch.nn.functional.linear, holder.router.detach(),
                                   t["router_bias"])


def apply(gm: fx.GraphModule, plans: list[LayerPlan], top_k: int, refit: bool = True) -> fx.GraphModule:
    """Write the MoE layers of `plans` for this top-k (total experts per token, shared included).
    refit: output rows and biases refit by least squares (moefy_refit), else biases only."""
    for done, p in enumerate(plans):
        E = len(p.groups)
        check_experts(E, top_k)
        if top_k <= p.shared:
            raise MoeccError(f"layer {p.name}: --top-k {top_k} must exceed the {p.shared} always-on "
                             "(shared) experts, which count within top-k")
        matches, _ = find_ffns(gm)          # each rewrite removes one FFN before the next ones
        m = matches[p.index - done] if p.index - done < len(matches) else None
        if m is None or m.name != p.name:
            raise MoeccError(f"moefy: FFN {p.index} of this graph is not {p.name}, which the plan was "
                             "made for: plan and apply on the same graph")
        w_a, d, fit = layer_refit(p, top_k, full=refit)
        t = _expert_tensors(gm, m, p, w_a, d)
        spec = MoESpec(num_experts=E, hidden=t["w_in"].shape[2], ffn=p.width, activation=m.activation,
                       router=RouterSpec("topk_unit", top_k, renormalize=False), expert_bias=True,
                       name=m.name).validate()
        moe = replace_ffn(gm, m, p.index, spec, t)
        _router_nodes(gm, moe, t)
        moe.meta[FACTS_KEY] = {**p.facts, "top_k": top_k, "active_fraction": round(top_k * p.width / (
            E * p.width - p.facts["padded_neurons"]), 4), "refit": "outputs" if refit else "biases",
            "held_out_ffn_error": round(fit["val_error"], 4)}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def moefy_facts(gm: fx.GraphModule) -> dict[str, dict]:
    """{layer name: facts} of every MoE node this pass wrote (see the module docstring)."""
    return {n.meta["moecc.spec"].name: n.meta[FACTS_KEY] for n in gm.graph.nodes if FACTS_KEY in n.meta}


def moefy(gm: fx.GraphModule, num_experts: int = 8, top_k: int = 2, layers: str = "all",
          method: str = "cluster", shared: int = 0, router: str = "linear", calibration=None,
          tokenize=None, seed: int = 0, refit: bool = True, heal: int = 0, heal_params: str = "all",
          heal_lr: float | None = None) -> PassResult:
    """heal > 0: after the split, distil the dense model into the MoEfied one for up to `heal` steps
    on the calibration data (moefy_heal); facts on gm.meta["moecc.heal"] (the manifest's "heal")."""
    check_experts(num_experts, top_k)
    moefy_heal.check_steps(heal)
    moefy_heal.check_params(heal_params)
    teacher = moefy_heal.teacher_copy(gm) if heal else None
    cal = None if calibration is None else calib.load(calibration, tokenize)
    plans, stats = plan(gm, num_experts, layers, method, shared, router, cal, tokenize, seed)
    apply(gm, plans, top_k, refit=refit)
    if heal:
        facts = moefy_heal.heal(gm, teacher, cal, heal, seed=seed, params=heal_params, lr=heal_lr)
        gm.meta[moefy_heal.FACTS_KEY] = facts
        for node, _ in moe_nodes(gm):
            node.meta[moefy_heal.FACTS_KEY] = {k: facts[k] for k in ("steps_run", "best_step", "params")}
        stats.update(heal_steps=facts["steps_run"], heal_best_step=facts["best_step"])
    return PassResult(gm, True, stats)


def make(options: dict):
    """Pass options (CLI names): moefy_router is the router's model (`router` names the routing pass's)."""
    kw = {k: options[k] for k in ("num_experts", "top_k", "layers", "method", "shared", "calibration",
                                  "tokenize", "seed", "refit", "heal", "heal_params", "heal_lr")
          if k in options and options[k] is not None}
    if "moefy_router" in options:
        kw["router"] = options["moefy_router"]
    return lambda gm: moefy(gm, **kw)
