"""The recognizer contract and the user's extension point.

    Recognizer(name, matches(module) -> bool, build(module, path) -> RecognizedMoE)
    block (an nn.Module the recognizer matches)  ⇒  RecognizedMoE(spec, the block's exact weights)

A recognizer is plain data: a cheap structural test and a builder. `build` raises `MoeccError(reason)`
to refuse a block it matched but cannot reproduce exactly (the block then stays as it is, with a
warning). Recognizers live in a `Registry` the caller owns; nothing registers itself on import:

    from moecc.recognize import default_registry, recognize, MoEMapping
    registry = default_registry()                  # the built-in families, a fresh object
    registry.register(MoEMapping(module="MOEFeedForward", router_weight="gate.weight",
                                 w_in=("cond_ffn.w1", "cond_ffn.w3"), w_out="cond_ffn.w2",
                                 top_k_attr="num_activated_experts"))
    model, report = recognize(model, registry)

`MoEMapping` is the declarative form (parameter paths + router/activation); for anything it cannot
say, write `build` yourself and return a `RecognizedMoE` (see samples/custom_moe.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import MoeccError
from ..spec import MoESpec, RouterSpec
from .block import RecognizedMoE


@dataclass(frozen=True)
class Recognizer:
    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, str], RecognizedMoE]


def by_class_name(*names: str) -> Callable[[nn.Module], bool]:
    """Match on the class name, so moecc needs no import of the model's library."""
    wanted = frozenset(names)
    return lambda module: type(module).__name__ in wanted


@dataclass(frozen=True)
class MoEMapping:
    """A block described by data: where its weights are and how it routes.

    Paths are relative to the block. Expert weights are stacked [E, out, in] (nn.Linear layout; set
    `transposed` for [E, in, out]); several `w_in` paths are concatenated on the output axis in the
    given order (gate first, then up, for gated activations).
    """

    module: str                                  # class name, e.g. "MOEFeedForward"
    router_weight: str                           # [E, H], e.g. "gate.weight"
    w_in: str | tuple[str, ...]                  # [E, F, H] each
    w_out: str                                   # [E, H, F]
    activation: str = "swiglu"
    router: RouterSpec = field(default_factory=lambda: RouterSpec(fp32=False))
    top_k_attr: str | None = None                # read k from this attribute of the block
    router_bias: str | None = None
    b_in: str | None = None
    b_out: str | None = None
    transposed: bool = False
    logits_fp32: bool = False                    # the block computes its router Linear in fp32
    returns: str = "y"

    def recognizer(self) -> Recognizer:
        return Recognizer(f"mapping:{self.module}", by_class_name(self.module), self._build)

    def _build(self, block: nn.Module, path: str) -> RecognizedMoE:
        get = lambda p: None if p is None else _tensor(block, p, path)   # noqa: E731
        w_ins = (self.w_in,) if isinstance(self.w_in, str) else self.w_in
        w_in = torch.cat([_layout(get(p), self.transposed) for p in w_ins], dim=1)   # [E, R, H]
        w_out = _layout(get(self.w_out), self.transposed)                             # [E, H, F]
        router = self.router
        if self.top_k_attr:
            router = dataclasses.replace(router, top_k=int(getattr(block, self.top_k_attr)))
        E, H, F = w_out.shape[0], w_out.shape[1], w_out.shape[2]
        spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation=self.activation, router=router,
                       expert_bias=self.b_in is not None, name=path).validate()
        return RecognizedMoE(spec, router_weight=get(self.router_weight), w_in=w_in, w_out=w_out,
                             router_bias=get(self.router_bias), b_in=get(self.b_in), b_out=get(self.b_out),
                             logits_fp32=self.logits_fp32, returns=self.returns,
                             recognizer=f"mapping:{self.module}")


def _tensor(block: nn.Module, path: str, where: str) -> torch.Tensor:
    try:
        return block.get_parameter(path)
    except AttributeError:
        try:
            return block.get_buffer(path)
        except AttributeError:
            raise MoeccError(f"{where or 'model'} ({type(block).__name__}): no parameter {path!r}; fix the "
                             f"MoEMapping's paths (named_parameters() lists them)") from None


def _layout(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.transpose(1, 2) if transposed else w


class Registry:
    """An ordered, caller-owned list of recognizers. The most recently registered match wins, so a
    user's registration overrides a built-in one for the same class."""

    def __init__(self, items: Iterable[Recognizer | MoEMapping] = ()):
        self._items: list[Recognizer] = []
        for item in items:
            self.register(item)

    def register(self, item: Recognizer | MoEMapping) -> Recognizer:
        rec = item.recognizer() if isinstance(item, MoEMapping) else item
        if not isinstance(rec, Recognizer):
            raise MoeccError(f"register() takes a Recognizer or an MoEMapping, got {type(item).__name__}")
        self._items.append(rec)
        return rec

    def match(self, module: nn.Module) -> Recognizer | None:
        return next((r for r in reversed(self._items) if r.matches(module)), None)

    def names(self) -> list[str]:
        return [r.name for r in self._items]

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Recognized:
    path: str                       # the block's place in the model ("" = the model itself)
    recognizer: str
    source_class: str
    spec: MoESpec
    probe_error: float | None       # max abs error vs the original block on a probe input (None: not run)


@dataclass
class Report:
    """What `recognize` did: blocks replaced, blocks refused (matched, not reproducible), and modules
    that look like an MoE but match no recognizer."""

    recognized: list[Recognized] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)       # (path, recognizer, why)
    unrecognized: list[tuple[str, str]] = field(default_factory=list)       # (path, why it looks like an MoE)

    def summary(self) -> str:
        lines = [f"{len(self.recognized)} MoE block(s) recognized"]
        for r in self.recognized:
            s = r.spec
            lines.append(f"  {r.path or '<model>'}: {r.recognizer} E={s.num_experts} k={s.top_k} "
                         f"router={s.router.kind} act={s.activation}"
                         + (f" shared={s.shared_ffn}" if s.shared_ffn else ""))
        lines += [f"  refused {p} ({rec}): {why}" for p, rec, why in self.refused]
        lines += [f"  unrecognized {p}: {why}" for p, why in self.unrecognized]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"recognized": [{"path": r.path, "recognizer": r.recognizer, "source_class": r.source_class,
                                "spec": r.spec.to_dict(), "probe_error": r.probe_error}
                               for r in self.recognized],
                "refused": [{"path": p, "recognizer": rec, "reason": why} for p, rec, why in self.refused],
                "unrecognized": [{"path": p, "reason": why} for p, why in self.unrecognized]}
