"""MoEfication: every dense FFN is split into E disjoint groups of its neurons, routed top-k, no training.

    Linear(W1, b1) → act → Linear(W2, b2)   ⇒  moe(topk_unit: E experts = slices of W1 rows / W2 columns)
    (act(x·Wg) ⊙ x·Wu)·Wd                    ⇒  moe(E gated experts, w_in = [Wg rows; Wu rows] of each slice)

    plan:  calibration → FFN inputs x [T, H] → hidden a [T, F] → neuron groups (moefy_partition)
           → per-expert drop error [T, E] → router fit (moefy_router) → compensation table
    apply: for a top-k, write the experts, router and biases; `replace_ffn` puts in the MoE node.

Each chosen expert is weighted 1 (router kind `topk_unit`), so with all experts on the MoE is the dense
FFN (up to float summation order). Choices made here, and why:
- E must divide F: when it does not, the groups differ by one neuron and the short ones are padded
  with zero neurons (zero rows/columns/biases: act(0)·0 = 0, exact); stats["padded_neurons"] says so.
- shared: the `shared` most active neurons (mean |contribution| to the output), rounded up to whole
  experts, form experts the router always picks (router bias ALWAYS_ON); they count within top-k.
- the router predicts each expert's drop error ‖contribution_e − its mean‖, so top-k keeps the experts
  whose absence would change the output most.
- compensation: each expert's b_out is −c_e (its mean contribution over the calibration tokens where
  the router leaves it out at this k), plus (b_out + Σ c)/k: with exactly k experts chosen per token the
  output is b_out + the chosen experts + the mean of the others (0 added when all are on).
Facts for the artifact (partition method, router and its held-out recall, calibration size and sha256,
active fraction, held-out FFN error at this k: mean ‖MoE − dense‖/‖dense‖ of the FFN output on calibration
tokens the router was not fitted on) are on each MoE node's `node.meta["moecc.moefy"]`;
`moefy_facts(gm)` collects them by layer name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from moecc import calibration as calib
from moecc.errors import MoeccError
from moecc.ops import activate
from moecc.pipeline import PassResult
from moecc.spec import MoESpec, RouterSpec

from . import moefy_partition, moefy_router
from .ffn_match import FFNMatch, find_ffns
from .moe_rewrite import _fake_val, param, replace_ffn, select_layers
from .upcycle import check_experts, no_ffn_error

FACTS_KEY = "moecc.moefy"
ALWAYS_ON = 1.0e4            # router logit of a shared (always-on) expert
VALIDATE_EVERY = 10          # every 10th calibration token scores the router, the rest fit it
CHECK_TOKENS = 256           # of those, kept in the plan to measure the FFN error at each k


@dataclass
class LayerPlan:
    index: int                       # into find_ffns' matches
    name: str
    groups: list                     # E tensors of real neuron indices (shared experts first)
    width: int                       # m: neurons per expert after padding
    shared: int                      # j: always-on experts
    router: dict                     # fitted on the E - j routed experts
    comp: torch.Tensor               # [E - j + 1, E, H]: c_e for routed k = 0..E-j
    facts: dict
    check: dict                      # held-out calibration tokens: routed contributions, logits, target


def _weights(gm: fx.GraphModule, m: FFNMatch):
    """(w_in rows [R, H] as a list per input Linear, b_in list, w_out [H, F], b_out [H] | None), float."""
    w_in = [param(gm, w).float() for w in m.w_in]
    b_in = [param(gm, b).float() if b is not None else torch.zeros(w.shape[0]) for b, w in zip(m.b_in, w_in)]
    b_out = param(gm, m.b_out).float() if m.b_out is not None else None
    return w_in, b_in, param(gm, m.w_out).float(), b_out


def _hidden(x, w_in, b_in, spec: MoESpec) -> torch.Tensor:
    """x [T, H] -> a [T, F]: the FFN's hidden activation (gated: act(gate) · up)."""
    return activate(torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(w_in, b_in)], -1), spec)


def _contribution(a: torch.Tensor, w_out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return a[:, idx] @ w_out[:, idx].t()                                    # [T, H]


def plan_layer(gm, m: FFNMatch, index: int, x: torch.Tensor, num_experts: int, method: str, shared: int,
               router: str, seed: int) -> LayerPlan:
    w_in, b_in, w_out, _ = _weights(gm, m)
    F_, E = w_out.shape[1], num_experts
    spec = MoESpec(num_experts=E, hidden=w_out.shape[0], ffn=F_, activation=m.activation)
    width = math.ceil(F_ / E)
    j = math.ceil(shared / width) if shared > 0 else 0
    if j >= E:
        raise MoeccError(f"layer {m.name}: --shared {shared} neurons fill {j} of the E={E} experts; "
                         "leave at least one expert to route")
    x = x.float()
    a = _hidden(x, w_in, b_in, spec)                                        # [T, F]
    importance = a.abs().mean(0) * w_out.norm(dim=0)                        # [F] mean |contribution|
    keep = torch.argsort(importance, descending=True)
    shared_idx, rest = keep[:j * width].sort().values, keep[j * width:].sort().values
    rows = torch.cat(w_in, dim=1)[rest] if len(w_in) > 1 else w_in[0][rest]  # [F', D] per neuron
    deviation = (a[:, rest] - a[:, rest].mean(0)).abs()                    # [T, F'] what dropping costs
    labels = moefy_partition.partition(method, E - j, rows=rows, active=deviation, seed=seed)
    routed = [rest[g] for g in moefy_partition.groups_of(labels, E - j)]
    groups = [shared_idx[i * width:(i + 1) * width] for i in range(j)] + routed
    contrib_mean, error = [], []
    for idx in routed:                                                      # [T, H] each
        c = _contribution(a, w_out, idx)
        contrib_mean.append(c.mean(0))
        error.append((c - contrib_mean[-1]).norm(dim=1))
    y = torch.stack(error, 1)                                               # [T, Er] drop error
    y = y / y.mean().clamp(min=1e-12)
    val = torch.arange(x.shape[0]) % VALIDATE_EVERY == 0
    fitted = moefy_router.fit(router, x[~val], y[~val], seed)
    pred = moefy_router.predict(fitted, x)                                  # [T, Er]
    comp = _compensation(a, w_out, routed, pred, j, E)
    facts = {"method": method, "router": router, "experts": E, "shared_experts": j,
             "shared_neurons": int(shared_idx.numel()), "width": width, "padded_neurons": E * width - F_,
             "router_recall": round(moefy_router.recall(pred[val], y[val]), 4),
             "random_recall": round(moefy_router.random_recall(y[val], seed), 4)}
    v = torch.nonzero(val).flatten()[:CHECK_TOKENS]
    check = {"routed": torch.stack([_contribution(a[v], w_out, idx) for idx in routed], 1),   # [V, Er, H]
             "logits": pred[v], "dense": _contribution(a[v], w_out, torch.arange(F_))}       # [V, Er], [V, H]
    check["shared"] = check["dense"] - check["routed"].sum(1)                                 # [V, H]
    return LayerPlan(index, m.name, groups, width, j, fitted, comp, facts, check)


def held_out_error(p: LayerPlan, k: int) -> float:
    """Mean relative error of the FFN output (bias aside) on held-out calibration tokens at top-k."""
    c, kr = p.check, k - p.shared
    comp = p.comp[kr][p.shared:]                                                  # [Er, H]
    chosen = torch.zeros_like(c["logits"]).scatter_(1, c["logits"].topk(kr, dim=1).indices, 1.0)
    approx = c["shared"] + (c["routed"] * chosen[..., None]).sum(1) + (1 - chosen) @ comp   # [V, H]
    return ((approx - c["dense"]).norm(dim=1) / c["dense"].norm(dim=1).clamp(min=1e-12)).mean().item()


def _compensation(a, w_out, routed, pred, j: int, E: int) -> torch.Tensor:
    """[Er + 1, E, H]: for routed k = 0..Er, each expert's mean contribution where top-k leaves it out."""
    Er, H = len(routed), w_out.shape[0]
    rank = torch.argsort(torch.argsort(pred, dim=1, descending=True), dim=1)  # [T, Er] 0 = best
    comp = torch.zeros(Er + 1, E, H)
    for e, idx in enumerate(routed):
        onehot = torch.nn.functional.one_hot(rank[:, e], Er).float()          # [T, Er]
        sums = onehot.t() @ _contribution(a, w_out, idx)                      # [Er, H] by rank
        counts = onehot.sum(0)                                                # [Er]
        tail_s = sums.flip(0).cumsum(0).flip(0)                               # ranks ≥ r
        tail_n = counts.flip(0).cumsum(0).flip(0)
        comp[:Er, j + e] = tail_s / tail_n.clamp(min=1).unsqueeze(1)          # left out at k = r
    return comp


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


def _expert_tensors(gm, m: FFNMatch, p: LayerPlan, k: int) -> dict:
    w_in, b_in, w_out, b_out = _weights(gm, m)
    E, width, H = len(p.groups), p.width, w_out.shape[0]
    dtype = param(gm, m.w_out).dtype

    def pad(idx):                                                           # [m] indices, -1 = zero neuron
        return torch.cat([idx, idx.new_full((width - idx.numel(),), -1)])

    def take(t, idx, dim):                                                  # t with a zero slice appended
        zero = torch.zeros_like(t.narrow(dim, 0, 1))
        return torch.cat([t, zero], dim).index_select(dim, torch.where(idx < 0, t.shape[dim], idx))

    cols = [pad(g) for g in p.groups]
    t_in = torch.stack([torch.cat([take(w, c, 0) for w in w_in]) for c in cols])       # [E, R, H]
    t_bin = torch.stack([torch.cat([take(b, c, 0) for b in b_in]) for c in cols])      # [E, R]
    t_out = torch.stack([take(w_out, c, 1) for c in cols])                             # [E, H, m]
    comp = p.comp[k - p.shared]                                                        # [E, H]
    base = (b_out if b_out is not None else torch.zeros(H)) + comp.sum(0)
    t_bout = base / k - comp                                                           # [E, H]
    r = {key: v.float() for key, v in p.router.items()}
    last_w, last_b = ("weight", "bias") if "weight" in r else ("w2", "b2")
    r[last_w] = torch.cat([torch.zeros(p.shared, r[last_w].shape[1]), r[last_w]])      # [E, ·]
    r[last_b] = torch.cat([torch.full((p.shared,), ALWAYS_ON), r[last_b]])
    t = {"router": r[last_w], "router_bias": r[last_b], "w_in": t_in, "w_out": t_out,
         "b_in": t_bin, "b_out": t_bout}
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


def apply(gm: fx.GraphModule, plans: list[LayerPlan], top_k: int) -> fx.GraphModule:
    """Write the MoE layers of `plans` for this top-k (total experts per token, shared included)."""
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
        t = _expert_tensors(gm, m, p, top_k)
        spec = MoESpec(num_experts=E, hidden=t["w_in"].shape[2], ffn=p.width, activation=m.activation,
                       router=RouterSpec("topk_unit", top_k, renormalize=False), expert_bias=True,
                       name=m.name).validate()
        moe = replace_ffn(gm, m, p.index, spec, t)
        _router_nodes(gm, moe, t)
        moe.meta[FACTS_KEY] = {**p.facts, "top_k": top_k, "active_fraction": round(top_k * p.width / (
            E * p.width - p.facts["padded_neurons"]), 4), "held_out_ffn_error": round(held_out_error(p, top_k), 4)}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def moefy_facts(gm: fx.GraphModule) -> dict[str, dict]:
    """{layer name: facts} of every MoE node this pass wrote (see the module docstring)."""
    return {n.meta["moecc.spec"].name: n.meta[FACTS_KEY] for n in gm.graph.nodes if FACTS_KEY in n.meta}


def moefy(gm: fx.GraphModule, num_experts: int = 8, top_k: int = 2, layers: str = "all",
          method: str = "cluster", shared: int = 0, router: str = "linear", calibration=None,
          tokenize=None, seed: int = 0) -> PassResult:
    check_experts(num_experts, top_k)
    plans, stats = plan(gm, num_experts, layers, method, shared, router, calibration, tokenize, seed)
    apply(gm, plans, top_k)
    return PassResult(gm, True, stats)


def make(options: dict):
    kw = {k: options[k] for k in ("num_experts", "top_k", "layers", "method", "shared", "router",
                                  "calibration", "tokenize", "seed") if k in options}
    return lambda gm: moefy(gm, **kw)
