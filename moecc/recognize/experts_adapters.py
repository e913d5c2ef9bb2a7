"""Experts modules outside transformers' ExpertsInterface, adapted while capturing: ONE moecc node each.

    DbrxExperts.forward(x, top_k_index, top_k_weights)         mlp.w1, mlp.v1, mlp.w2 [E·F, H]
      ⇒ experts(x, ids, weights, w_in = [w1; v1] [E, 2F, H], w_out = w2ᵀ [E, H, F])
    LongcatFlashExperts.forward(x, top_k_index, top_k_weights) gate_up_proj [E+Z, 2F, H], down_proj [E, H, F]
      ⇒ experts(x, ids (ids ≥ E made -1), weights, gate_up_proj[:E], down_proj)
        + Σ(weights of ids ≥ E) · x                            (the Z zero-compute "identity" experts)
    JetMoeMoE.forward(x)  (a router that calls .tolist(): data-dependent, so the block is adapted)
      ⇒ logits = router.layer(x).float(); top-k logits → softmax over k → weights (x's dtype)
        experts(x, ids, weights, input_linear.weight [E, 2F, H], output_linear.weight [E, H, F]) + bias

    DogeCDMoE.forward(x)  (product-key retrieval experts of one neuron: down_embed, up_embed [E, H])
      ⇒ its router as is; experts(x, ids, weights, down_embed [E, 1, H], up_embed [E, H, 1]) (F = 1,
        not gated) + its shared FFN

    Llama4TextMoe.forward(x)  (each chosen expert's INPUT scaled by its sigmoid score, every expert run)
      ⇒ its router op for op: top-k logits, s = sigmoid; the T·k (slot, token) rows s·x through
        experts(rows [k·T, H], ids [k·T, 1], weights 1, gate_up_projᵀ [E, 2F, H], down_projᵀ [E, H, F]),
        summed over the k slots, + its shared expert (as HF: unchosen experts add exact zeros)

    JetMoeMoA.map / .reduce (a mixture of attention: not an FFN MoE, no moecc node)
      ⇒ the same top-k softmax, every expert's projection computed and the chosen gathered: static
        shapes (its .tolist() left unbacked sizes that TVM's decomposition refused); reported as refused

The family's routing stays as ordinary ops (DBRX's and LongCat's routers are untouched; JetMoE's is
written again, op for op, without the .tolist()). While `capturing`, each adapted module's forward is
replaced by the adapter's and its weights by the canonical layout (same attribute names, converted
once; a weight the layout no longer needs is set to None so the graph holds no copy); all is put back
on exit, so the user's model is unchanged. The gate is probed bit for bit against the MoESpec
activations (`experts_interface.probe_gate`); a gate moecc cannot express is refused with the reason
and that module runs the same sum as ordinary ops (each slot's expert weights gathered, exportable to
every backend). Nothing is registered at import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import MoeccError
from ..ops import call_experts
from ..spec import MoESpec, RouterSpec
from .experts_interface import _PLAIN, ExpertsPlan, InterfaceReport, combine, probe_gate

log = logging.getLogger("moecc.recognize.experts_adapters")

_GATED = ("swiglu", "geglu", "geglu_tanh")


@dataclass(frozen=True)
class Adapted:
    plan: ExpertsPlan | None                        # None: refused (`reason`), the gathered ordinary ops run
    forward: Callable                               # forward(module, adapted, *args) while capturing
    swaps: tuple[tuple[nn.Module, str, Tensor | None], ...]   # (owner, attribute, canonical value)
    gate: Callable[[Tensor], Tensor]                # the module's own act_fn(gate) · up: [n, 2F] -> [n, F]
    reason: str | None = None


# ---- the adapters: module -> Adapted, or MoeccError(reason) for a layout they cannot read ----------

def _dbrx(ex: nn.Module, path: str) -> Adapted:
    mlp, E, F, H = ex.mlp, ex.num_experts, ex.ffn_hidden_size, ex.hidden_size
    for n in ("w1", "v1", "w2"):
        if tuple(getattr(mlp, n).shape) != (E * F, H):
            raise MoeccError(f"{path} (DbrxExperts): mlp.{n} is {tuple(getattr(mlp, n).shape)}, not [E·F, H] = "
                             f"[{E * F}, {H}]")
    w_in = torch.cat([mlp.w1.detach().view(E, F, H), mlp.v1.detach().view(E, F, H)], dim=1)   # [E, 2F, H]
    w_out = mlp.w2.detach().view(E, F, H).transpose(1, 2)                                      # [E, H, F]
    swaps = ((mlp, "w1", _param(w_in, mlp.w1)), (mlp, "w2", _param(w_out, mlp.w2)), (mlp, "v1", None))
    return _adapted(mlp.activation_fn, mlp.w1.dtype, E, H, F, path, "DbrxExperts", _dbrx_forward, swaps)


def _dbrx_forward(ex: nn.Module, a: Adapted, hidden_states: Tensor, top_k_index: Tensor,
                  top_k_weights: Tensor) -> Tensor:
    x, ids, weights = _flat(hidden_states, top_k_index, top_k_weights)
    y = _experts(ex, a, x, ids, weights, ex.mlp.w1, ex.mlp.w2)                     # [T, H]
    return y.view(hidden_states.shape[0], -1, x.shape[-1])                          # as DbrxExperts returns


def _longcat(ex: nn.Module, path: str) -> Adapted:
    E, Z = ex.num_routed_experts, ex.zero_expert_num
    if E == 0 or ex.gate_up_proj is None:
        raise MoeccError(f"{path} (LongcatFlashExperts): no routed experts (only identity experts)")
    w_in, w_out = ex.gate_up_proj, ex.down_proj
    R, H = w_in.shape[1:]
    F = w_out.shape[2]
    if w_in.shape[0] != E + Z or R != 2 * F or tuple(w_out.shape) != (E, H, F):
        raise MoeccError(f"{path} (LongcatFlashExperts): weights {tuple(w_in.shape)} / {tuple(w_out.shape)} "
                         f"are not [E+Z, 2F, H] / [E, H, F] with E={E}, Z={Z}")
    swaps = ((ex, "gate_up_proj", _param(w_in.detach()[:E], w_in)),) if Z else ()
    return _adapted(ex.act_fn, w_in.dtype, E, H, F, path, "LongcatFlashExperts", _longcat_forward, swaps)


def _longcat_forward(ex: nn.Module, a: Adapted, hidden_states: Tensor, top_k_index: Tensor,
                     top_k_weights: Tensor) -> Tensor:
    x, ids, weights = _flat(hidden_states, top_k_index, top_k_weights)
    zero = ids >= ex.num_routed_experts                                             # [T, k] identity experts
    y = _experts(ex, a, x, ids.masked_fill(zero, -1), weights, ex.gate_up_proj, ex.down_proj)      # [T, H]
    if ex.zero_expert_num:
        w0 = weights.masked_fill(~zero, 0).sum(-1, keepdim=True)                  # [T, 1]
        y = y + (w0 * x).to(x.dtype)
    return y.reshape(hidden_states.shape)


def _jetmoe(block: nn.Module, path: str) -> Adapted:
    w_in, w_out = block.input_linear.weight, block.output_linear.weight
    E, R, H = w_in.shape
    F = w_out.shape[2]
    if R != 2 * F or tuple(w_out.shape) != (E, H, F) or block.router.layer.weight.shape[0] != E:
        raise MoeccError(f"{path} (JetMoeMoE): weights {tuple(w_in.shape)} / {tuple(w_out.shape)} are not "
                         f"[E, 2F, H] / [E, H, F] with a router of E rows")
    return _adapted(block.activation, w_in.dtype, E, H, F, path, "JetMoeMoE", _jetmoe_forward, ())


def _jetmoe_forward(block: nn.Module, a: Adapted, layer_input: Tensor) -> Tensor:
    bsz, length, H = layer_input.shape
    x = layer_input.reshape(-1, H)                                                  # [T, H]
    logits = block.router.layer(x).float()                                          # [T, E]
    top_logits, ids = logits.topk(block.router.top_k, dim=1)                        # [T, k]
    weights = torch.softmax(top_logits, dim=1).type_as(x)                           # [T, k]
    y = _experts(block, a, x, ids, weights, block.input_linear.weight, block.output_linear.weight)
    return y.view(bsz, length, H) + block.bias


def _doge(block: nn.Module, path: str) -> Adapted:
    """Doge's cross-domain MoE: E retrieval experts of ONE neuron each (down_embed [E, H], up_embed [E, H]),
    routed by product keys: expert e(x) = up_e · act(down_e · x), i.e. experts of F = 1."""
    down, up = block.down_embed.weight, block.up_embed.weight
    E, H = down.shape
    if tuple(up.shape) != (E, H):
        raise MoeccError(f"{path} (DogeCDMoE): up_embed {tuple(up.shape)} is not down_embed's [E, H] = [{E}, {H}]")
    swaps = ((block.down_embed, "weight", _param(down.detach().unsqueeze(1), down)),      # [E, 1, H]
             (block.up_embed, "weight", _param(up.detach().unsqueeze(-1), up)))          # [E, H, 1]
    return _adapted(block.act_fn, down.dtype, E, H, 1, path, "DogeCDMoE", _doge_forward, swaps, gated=False)


def _doge_forward(block: nn.Module, a: Adapted, hidden_states: Tensor, **kwargs):
    """DogeCDMoE.forward with its routed experts as one experts node (its router and shared FFN as they are)."""
    bsz, seq_len, H = hidden_states.shape
    # its .view(2, B·S, -1) (the halves of the flat logits: tokens mixed, as HF) written as a view of the
    # flat logits: the same values, without the guard B·S % 2 == 0 export adds for the 3-D view
    router_logits = block.router_gate(hidden_states).reshape(-1).view(2, -1, block.num_keys)   # [2, T, keys]
    (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(block.num_keys, dim=-1)
    all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(-2)           # [T, keys²]
    all_indices = (indices_x.unsqueeze(-1) * block.num_keys + indices_y.unsqueeze(-2)).flatten(-2)
    scores, position_indices = all_scores.topk(block.top_k, dim=-1)                      # [T, k]
    ids = all_indices.gather(-1, position_indices)                                       # [T, k]
    weights = torch.softmax(scores, dim=-1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    x = hidden_states.reshape(-1, H)                                                     # [T, H]
    y = _experts(block, a, x, ids, weights, block.down_embed.weight, block.up_embed.weight)
    shared = block.down_proj(block.act_fn(block.gate_proj(hidden_states)) * block.up_proj(hidden_states))
    return shared + y.view(bsz, seq_len, H), router_logits


def _llama4(block: nn.Module, path: str) -> Adapted:
    ex = block.experts
    w_in, w_out = ex.gate_up_proj, ex.down_proj                                     # [E, H, 2F], [E, F, H]
    E, H, R = w_in.shape
    F = w_out.shape[1]
    if R != 2 * F or tuple(w_out.shape) != (E, F, H) or block.router.weight.shape[0] != E:
        raise MoeccError(f"{path} (Llama4TextMoe): weights {tuple(w_in.shape)} / {tuple(w_out.shape)} are not "
                         f"[E, H, 2F] / [E, F, H] with a router of E rows")
    swaps = ((ex, "gate_up_proj", _param(w_in.detach().transpose(1, 2), w_in)),       # [E, 2F, H]
             (ex, "down_proj", _param(w_out.detach().transpose(1, 2), w_out)))         # [E, H, F]
    return _adapted(ex.act_fn, w_in.dtype, E, H, F, path, "Llama4TextMoe", _llama4_forward, swaps)


def _llama4_forward(block: nn.Module, a: Adapted, hidden_states: Tensor):
    """Llama4TextMoe.forward: y = shared(x) + Σ_slots expert_id(s · x), the router (Llama4Router) op for op."""
    H = block.hidden_dim
    x = hidden_states.reshape(-1, H)                                                # [T, H]
    router_logits = nn.Linear.forward(block.router, x)                              # [T, E]
    top, ids = torch.topk(router_logits, block.router.top_k, dim=1)                 # [T, k]
    scores = torch.sigmoid(top.float()).to(top.dtype)                               # [T, k]
    k = ids.shape[1]
    rows = (x.unsqueeze(0) * scores.t().unsqueeze(-1)).reshape(-1, H)               # [k·T, H], slot-major
    slot_ids = ids.t().reshape(-1, 1)                                               # [k·T, 1]
    ones = torch.ones(slot_ids.shape, dtype=x.dtype, device=x.device)               # [k·T, 1]
    y = _experts(block, a, rows, slot_ids, ones, block.experts.gate_up_proj, block.experts.down_proj)
    return block.shared_expert(x) + y.view(k, -1, H).sum(0), router_logits          # [T, H], [T, E]


def _moa_map(moa: nn.Module, layer_input: Tensor):
    """JetMoeMoA.map without .tolist(): each token's k query projections, every expert computed and the
    chosen gathered ([T, E, D]: E is small), so sizes stay static."""
    bsz, length, H = layer_input.shape
    x = layer_input.reshape(-1, H)                                                  # [T, H]
    logits = moa.router.layer(x).float()                                            # [T, E]
    top_logits, ids = logits.topk(moa.top_k, dim=1)                                 # [T, k]
    gates = torch.softmax(top_logits, dim=1).type_as(x)                             # [T, k]
    q = torch.einsum("th,edh->ted", x, moa.input_linear.weight)                     # [T, E, D]
    q = q.gather(1, ids.unsqueeze(-1).expand(-1, -1, q.shape[-1]))                  # [T, k, D]
    return q.view(bsz, length, moa.top_k, -1), logits, (ids, gates)


def _moa_reduce(moa: nn.Module, layer_input: Tensor, topo_info):
    bsz, length, k, D = layer_input.shape
    ids, gates = topo_info
    a = layer_input.reshape(-1, k, D)                                               # [T, k, D]
    o = torch.einsum("tkd,ehd->tkeh", a, moa.output_linear.weight)                  # [T, k, E, H]
    o = o.gather(2, ids[:, :, None, None].expand(-1, -1, 1, o.shape[-1])).squeeze(2)   # [T, k, H]
    return (o * gates.unsqueeze(-1)).sum(1).view(bsz, length, -1) + moa.bias


ADAPTERS: dict[str, Callable[[nn.Module, str], Adapted]] = {
    "DbrxExperts": _dbrx, "LongcatFlashExperts": _longcat, "JetMoeMoE": _jetmoe, "DogeCDMoE": _doge,
    "Llama4TextMoe": _llama4}
# not an FFN MoE, so no moecc node: only rewritten as static-shape ordinary ops (reported as refused)
REWRITES: dict[str, tuple[str, dict[str, Callable]]] = {
    "JetMoeMoA": ("a mixture of attention (query/output projections as experts) is not an FFN MoE; it stays "
                  "ordinary ops, rewritten without its router's .tolist()", {"map": _moa_map, "reduce": _moa_reduce})}


# ---- shared pieces ---------------------------------------------------------------------------

def _adapted(act_fn, dtype: torch.dtype, E: int, H: int, F: int, path: str, name: str, forward,
             swaps, gated: bool = True) -> Adapted:
    """Gated experts computing act_fn(gate) · up on [gate; up] (or, not gated, act_fn(h)): the activation
    probed bit for bit (refused with the reason when no MoESpec activation equals it)."""
    def gate(h):                                                                    # [n, R] -> [n, F]
        if not gated:
            return act_fn(h)
        g, u = h.chunk(2, dim=-1)
        return act_fn(g) * u
    names = _GATED if gated else _PLAIN
    try:
        act, extra = probe_gate(gate, dtype, 2 * F if gated else F, gated,
                                [(a, {"interleaved": False} if gated else {}) for a in names],
                                f"{path} ({name})", f"{path}: activation {type(act_fn).__name__} of {name} "
                                f"({dtype})", f"{'gated ' if gated else ''}{', '.join(names)}")
    except MoeccError as e:
        return Adapted(None, forward, swaps, gate, str(e))
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation=act, router=RouterSpec(top_k=1, fp32=False),
                   name=path, **extra).validate()
    return Adapted(ExpertsPlan(spec, path, name), forward, swaps, gate)


def _experts(module: nn.Module, a: Adapted, x: Tensor, ids: Tensor, weights: Tensor, w_in: Tensor,
             w_out: Tensor) -> Tensor:
    """x [T, H], ids [T, k] (-1 = empty), weights [T, k] -> y [T, H]: one moecc::experts node, or for a
    refused module the same sum as ordinary ops (each slot's expert weights gathered, as transformers'
    batched_mm): exportable to every backend, with the module's own gate."""
    if a.plan is not None:
        spec = a.plan.spec.replace(router=dataclasses.replace(a.plan.spec.router, top_k=int(ids.shape[1])),
                                   combine=combine(x.dtype, weights.dtype))
        _traced[id(module)] = spec
        return call_experts(x, ids, weights, w_in, w_out, spec)
    e = ids.clamp(min=0)                                                            # [T, k]
    h = torch.matmul(w_in[e], x[:, None, :, None]).squeeze(-1)                     # [T, k, 2F]
    h = torch.matmul(w_out[e], a.gate(h).unsqueeze(-1)).squeeze(-1)                # [T, k, H]
    w = weights.masked_fill(ids < 0, 0).unsqueeze(-1)                               # [T, k, 1]
    return (h * w).to(x.dtype).sum(1)                                               # [T, H]


def _param(value: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(value.contiguous(), requires_grad=like.requires_grad)


def _flat(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
    """x [T, H], ids [T, k] int64, weights [T, k]."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    k = top_k_index.shape[-1]
    return x, top_k_index.reshape(x.shape[0], k).to(torch.int64), top_k_weights.reshape(x.shape[0], k)


_traced: dict[int, MoESpec] = {}                    # id(module) -> the spec its traced call used


def is_adapted(module: nn.Module) -> bool:
    """A module an adapter knows, unless its (newer) transformers put it behind the ExpertsInterface:
    transformers 5.25 decorates LongcatFlashExperts, which the interface then captures."""
    from .experts_interface import is_hf_experts
    return (type(module).__name__ in ADAPTERS or type(module).__name__ in REWRITES) and not is_hf_experts(module)


def contains_adapted(module: nn.Module) -> bool:
    return any(is_adapted(m) for m in module.modules())


@contextlib.contextmanager
def capturing(model: nn.Module) -> Iterator[InterfaceReport]:
    """While inside: every module an adapter knows runs the adapter's forward on canonical weights: one
    moecc::experts node, or (its gate refused, the reason in the report) gathered ordinary ops. A layout
    an adapter cannot read keeps the module's own forward. Everything is restored on exit."""
    report = InterfaceReport()
    modules = [(p, m) for p, m in model.named_modules() if is_adapted(m)]
    done: list[tuple[nn.Module, Adapted]] = []
    swapped: list[tuple[nn.Module, str, Tensor | None]] = []
    patched: list[tuple[nn.Module, list[str]]] = []
    try:
        for path, m in modules:
            if type(m).__name__ in REWRITES:
                why, methods = REWRITES[type(m).__name__]
                for name, fn in methods.items():
                    setattr(m, name, types.MethodType(fn, m))
                patched.append((m, list(methods)))
                report.refused.append((path, why))
                continue
            try:
                adapted = ADAPTERS[type(m).__name__](m, path)
            except MoeccError as e:
                report.refused.append((path, str(e)))
                log.warning("experts adapter: %s; it stays as its own ops", e)
                continue
            for owner, name, value in adapted.swaps:
                swapped.append((owner, name, getattr(owner, name)))
                setattr(owner, name, value)
            m.forward = types.MethodType(lambda self, *args, _a=adapted: _a.forward(self, _a, *args), m)
            done.append((m, adapted))
            if adapted.plan is None:
                report.refused.append((path, adapted.reason))
                log.warning("experts adapter: %s; it runs as ordinary ops (each slot's expert gathered)",
                            adapted.reason)
                continue
            report.captured.append(adapted.plan)
            log.info("experts adapter: %s (%s) -> moecc::experts E=%d act=%s", path, adapted.plan.source_class,
                     adapted.plan.spec.num_experts, adapted.plan.spec.activation)
        yield report
    finally:
        for owner, name, old in reversed(swapped):
            setattr(owner, name, old)
        for m, _ in done:
            del m.forward
        for m, names in patched:
            for name in names:
                delattr(m, name)
        traced = {id(a.plan): _traced.pop(id(m), None) for m, a in done}
        for i, plan in enumerate(report.captured):
            if traced.get(id(plan)) is not None:
                report.captured[i] = dataclasses.replace(plan, spec=traced[id(plan)])
