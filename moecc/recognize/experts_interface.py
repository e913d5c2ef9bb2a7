"""transformers 5.x experts through its own ExpertsInterface: the experts call becomes ONE moecc node.

    @use_experts_implementation class XxxExperts:  forward(x [T, H], top_k_index [T, k], top_k_weights [T, k])
      dispatched by config._experts_implementation through transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS
    ⇒ "moecc": torch.ops.moecc.experts(x, ids, weights, w_in [E, R, H], w_out [E, H, F], b_in?, b_out?, spec)

The family's router (the code that makes top_k_index / top_k_weights) is left alone: ordinary ops in
the graph, exact by construction. What moecc must reproduce is only the experts call, described by the
class's layout flags (is_concatenated, is_transposed, has_bias, has_gate, has_post_expert_norm) and its
gate (`_apply_gate`, or `act_fn` when has_gate is False). The gate is not read from source: it is probed
against each MoESpec activation it could be (same dtype, values past any clamp) and must agree bit for
bit. A layout or gate moecc cannot express is refused with the reason; that module then runs transformers'
`batched_mm` implementation (plain bmm/gather ops every exporter handles; the default `grouped_mm` calls
`F.grouped_mm`, which the ONNX exporter cannot convert).

Layouts are converted once, while capturing (`capturing`): transposed weights [E, H, R] are swapped for
contiguous [E, R, H] parameters for the export and put back after, so the graph holds no per-call
transposes and the user's model is unchanged afterwards. Nothing is registered at import: `register()`
is called by capture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import MoeccError
from ..ops import activate, call_experts
from ..spec import GATED, MoESpec, RouterSpec

log = logging.getLogger("moecc.recognize.experts_interface")

IMPLEMENTATION = "moecc"
FALLBACK = "batched_mm"
MARK = "_moecc_experts"                      # per-module attribute holding the ExpertsPlan while capturing
TRACED = "_moecc_traced_spec"                # ... and the spec its traced call used (top_k, combine)
FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias", "has_post_expert_norm")
_PLAIN = ("relu", "relu2", "gelu", "gelu_tanh", "silu")
_ALPHA = ("alpha", "swiglu_alpha")           # GPT-OSS / MiniMax-M3 / privacy-filter spellings
_LIMIT = ("limit", "swiglu_limit")


@dataclass(frozen=True)
class ExpertsPlan:
    spec: MoESpec               # router fields: top_k only (the routing itself is in the graph)
    path: str
    source_class: str


def register() -> None:
    """Add the moecc implementation to transformers' ExpertsInterface (idempotent; explicit, not at import)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] = experts_forward


def is_hf_experts(module: nn.Module) -> bool:
    """A module whose class was decorated by transformers' `use_experts_implementation`."""
    return all(hasattr(module, f) for f in FLAGS) and hasattr(module, "config") and hasattr(module, "down_proj")


def contains_hf_experts(module: nn.Module) -> bool:
    return any(is_hf_experts(m) for m in module.modules())


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The function registered as "moecc": one moecc::experts node, or batched_mm for a refused module."""
    plan: ExpertsPlan | None = getattr(self, MARK, None)
    if plan is None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        return ALL_EXPERTS_FUNCTIONS[FALLBACK](self, hidden_states, top_k_index, top_k_weights)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])                                       # [T, H]
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(x.shape[0], k).to(torch.int64)                       # [T, k]
    weights = top_k_weights.reshape(x.shape[0], k)                                 # [T, k]
    spec = plan.spec.replace(router=dataclasses.replace(plan.spec.router, top_k=int(k)),
                             combine=combine(x.dtype, weights.dtype))
    setattr(self, TRACED, spec)
    w_in = self.gate_up_proj if self.has_gate else self.up_proj                    # [E, R, H] (converted)
    b_in = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    b_out = self.down_proj_bias if self.has_bias else None
    y = call_experts(x, ids, weights, w_in, self.down_proj, spec, b_in=b_in, b_out=b_out)   # [T, H]
    return y.reshape(shape)


def combine(act: torch.dtype, weight: torch.dtype) -> str:
    """HF's experts multiply an expert's output by its weight as torch promotes them: a float32 weight
    on half activations is an fp32 product rounded once (MoESpec "weight_fp32")."""
    return "weight_fp32" if weight == torch.float32 and act != torch.float32 else "weight_in_act"


def plan_experts(ex: nn.Module, path: str) -> ExpertsPlan:
    """The MoESpec of an HF experts module, or MoeccError(reason) when moecc cannot express it."""
    name = type(ex).__name__
    if getattr(ex, "has_post_expert_norm", False):
        raise MoeccError(f"{path} ({name}): a norm after each expert (has_post_expert_norm) has no MoESpec form")
    if getattr(ex, "_is_expert_parallel", False):
        raise MoeccError(f"{path} ({name}): already expert-parallel (sentinel ids); capture the unsharded model")
    gated = bool(ex.has_gate)
    w_in = ex.gate_up_proj if gated else ex.up_proj
    w_out = ex.down_proj
    if not (isinstance(w_in, Tensor) and isinstance(w_out, Tensor) and w_in.dim() == 3 and w_out.dim() == 3):
        raise MoeccError(f"{path} ({name}): expert weights are not stacked 3-D tensors")
    if ex.is_transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    E, R, H = w_in.shape
    F = w_out.shape[2]
    if w_out.shape[:2] != (E, H) or R != (2 * F if gated else F):
        raise MoeccError(f"{path} ({name}): weight shapes {tuple(w_in.shape)} / {tuple(w_out.shape)} are not "
                         f"[E, {'2F' if gated else 'F'}, H] / [E, H, F]")
    act, extra = probe_activation(ex, w_in.dtype, R, gated, path)
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation=act, router=RouterSpec(top_k=1, fp32=False),
                   expert_bias=bool(ex.has_bias), bias_add="after_gemm" if ex.is_transposed else "in_gemm",
                   name=path, **extra).validate()
    return ExpertsPlan(spec, path, name)


def _candidates(ex: nn.Module, gated: bool) -> Iterator[tuple[str, dict]]:
    if not gated:
        for a in _PLAIN:
            yield a, {}
        return
    for interleaved in (not ex.is_concatenated,):
        for a in ("swiglu", "geglu", "geglu_tanh"):
            yield a, {"interleaved": interleaved}
        alphas = [float(getattr(ex, n)) for n in _ALPHA if isinstance(getattr(ex, n, None), (int, float))]
        limits = [float(getattr(ex, n)) for n in _LIMIT if isinstance(getattr(ex, n, None), (int, float))]
        for alpha in alphas:
            for limit in limits:
                yield "swiglu_oai", {"interleaved": interleaved, "act_alpha": alpha, "act_limit": limit}
        for limit in limits:
            yield "swiglu_clamp", {"interleaved": interleaved, "act_limit": limit}
        caps = [getattr(getattr(getattr(ex, "act_fn", None), n, None), "softcap", None)
                for n in ("gate_softcap", "up_softcap")]
        if all(isinstance(c, (int, float)) and c > 0 for c in caps):
            yield "swiglu_softcap", {"interleaved": interleaved, "act_limit": float(caps[0]),
                                     "act_alpha": float(caps[1])}


def probe_activation(ex: nn.Module, dtype: torch.dtype, R: int, gated: bool, path: str) -> tuple[str, dict]:
    """The MoESpec activation equal, bit for bit, to the module's gate (`_apply_gate`) or `act_fn`."""
    what = f"_apply_gate of {type(ex).__name__}" if gated else f"activation {type(ex.act_fn).__name__}"
    layout = "interleaved" if not ex.is_concatenated else "concatenated"
    return probe_gate(ex._apply_gate if gated else ex.act_fn, dtype, R, gated, _candidates(ex, gated),
                      f"{path} ({type(ex).__name__})", f"{path}: {what} ({dtype})",
                      f"{', '.join(GATED if gated else _PLAIN)}, {layout}")


def probe_gate(fn, dtype: torch.dtype, R: int, gated: bool, candidates, where: str, what: str,
               tried: str) -> tuple[str, dict]:
    """The first (activation, extra MoESpec fields) of `candidates` whose `activate` equals fn(h) bit
    for bit on h [n, R] (same dtype, values past any clamp), else MoeccError naming `what`/`tried`."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(64, R, generator=gen) * 6).to(dtype)           # [n, R], past a clamp at 7 and below -7
    h[0] = torch.linspace(-12, 12, R).to(dtype)
    with torch.no_grad():
        try:
            want = fn(h)
        except Exception as e:    # a gate with another signature (e.g. act_fn(gate, up))
            raise MoeccError(f"{where}: its gate could not be probed: {type(e).__name__}: {e}") from None
        for act, extra in candidates:
            spec = MoESpec(num_experts=2, hidden=1, ffn=R // 2 if gated else R, activation=act, **extra)
            got = activate(h, spec)
            if got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want):
                return act, extra
    raise MoeccError(f"{what} equals no MoESpec activation ({tried})")


@dataclass
class InterfaceReport:
    captured: list[ExpertsPlan] = dataclasses.field(default_factory=list)
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)     # (path, reason)

    def to_dict(self) -> dict:
        return {"captured": [{"path": p.path, "source_class": p.source_class, "spec": p.spec.to_dict()}
                             for p in self.captured],
                "refused": [{"path": p, "reason": why} for p, why in self.refused]}


@contextlib.contextmanager
def capturing(model: nn.Module) -> Iterator[InterfaceReport]:
    """While inside: every HF experts module of `model` dispatches to "moecc" (its own plan, or
    batched_mm when refused), transposed weights are canonical. Everything is restored on exit."""
    report = InterfaceReport()
    modules = [(p, m) for p, m in model.named_modules() if is_hf_experts(m)]
    if not modules:
        yield report
        return
    register()
    configs, swapped = {}, []
    try:
        for path, ex in modules:
            configs.setdefault(id(ex.config), (ex.config, ex.config._experts_implementation))
            try:
                plan = plan_experts(ex, path)
            except MoeccError as e:
                report.refused.append((path, str(e)))
                log.warning("experts interface: %s; it stays as ordinary ops (transformers' %s)", e, FALLBACK)
                continue
            if ex.is_transposed:
                for name in ("gate_up_proj" if ex.has_gate else "up_proj", "down_proj"):
                    old = getattr(ex, name)
                    swapped.append((ex, name, old))
                    setattr(ex, name, nn.Parameter(old.detach().transpose(1, 2).contiguous(),
                                                   requires_grad=old.requires_grad))
            setattr(ex, MARK, plan)
            report.captured.append(plan)
            log.info("experts interface: %s (%s) -> moecc::experts E=%d act=%s", path, plan.source_class,
                     plan.spec.num_experts, plan.spec.activation)
        for config, _ in configs.values():
            config._experts_implementation = IMPLEMENTATION
        yield report
    finally:
        for config, old in configs.values():
            config._experts_implementation = old
        for ex, name, old in reversed(swapped):
            setattr(ex, name, old)
        by_path = dict(modules)
        for i, plan in enumerate(report.captured):
            traced = getattr(by_path[plan.path], TRACED, None)
            if traced is not None:
                report.captured[i] = dataclasses.replace(plan, spec=traced)
        for _, ex in modules:
            for attr in (MARK, TRACED):
                if hasattr(ex, attr):
                    delattr(ex, attr)


EXPERTS_OP = torch.ops.moecc.experts.default
_SPEC_ARG = 7                                # experts(x, ids, weights, w_in, w_out, b_in, b_out, spec, kernel)


def annotate_experts(gm):
    """node.meta["moecc.spec"] on every moecc::experts node of a captured graph (from its spec argument)."""
    from ..ops import parse_spec
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is EXPERTS_OP:
            node.meta["moecc.spec"] = parse_spec(node.args[_SPEC_ARG])
    return gm
