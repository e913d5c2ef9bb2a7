"""Recognize known MoE blocks and replace them, in place, by modules calling `torch.ops.moecc.moe`.

    recognize(model, recognizers=None) -> (model, Report)
    nn.Module tree: ... block (MixtralSparseMoeBlock, DeepseekV3MoE, a user's MOEFeedForward, ...) ...
                ⇒   ... RecognizedMoE(spec, the block's exact weights) ...   (then torch.export: one node)

Run before torch.export. Each replacement is checked against the block it replaces on a small probe
input (same outputs within fp tolerance, same output structure); a block that fails the check, or
that its recognizer refuses, stays as it was, with a warning. Modules that look like an MoE but match
no recognizer are reported too (`detect.py`): never silently wrong.

Built-in families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, switch
(transformers 5.x). Extension point: `base.py` (Registry, Recognizer, MoEMapping).

Every other transformers 5.x family whose experts class uses `use_experts_implementation` is captured
by `experts_interface.py` during export (its router stays ordinary ops, the experts call becomes one
moecc::experts node). Experts modules outside the interface with the same call (DbrxExperts,
LongcatFlashExperts) and JetMoE's block are adapted the same way by `experts_adapters.py`. The
recognizers win where they match: their moe node carries the router, so
passes (route, capacity) can still change it, and their bf16 numerics are pinned by tests.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

from torch import nn

from ..errors import MoeccError
from ..nn import MoE
from .base import MoEMapping, Recognized, Recognizer, Registry, Report, by_class_name
from .block import RecognizedMoE
from .detect import ADVICE, UnrecognizedMoEWarning, looks_like_moe
from .verify import probe

__all__ = ["recognize", "default_registry", "Registry", "Recognizer", "MoEMapping", "RecognizedMoE",
           "Report", "Recognized", "by_class_name", "UnrecognizedMoEWarning", "looks_like_moe"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch")
ON_UNRECOGNIZED = ("warn", "error", "ignore")


def default_registry() -> Registry:
    """A fresh registry holding the built-in recognizers (yours to extend; nothing global changes)."""
    import importlib
    return Registry(importlib.import_module(f".{f}", __name__).RECOGNIZER for f in FAMILIES)


def recognize(model: nn.Module, recognizers: Registry | Iterable[Recognizer | MoEMapping] | None = None, *,
              on_unrecognized: str = "warn", verify: bool = True,
              defer: Callable[[nn.Module], bool] | None = None) -> tuple[nn.Module, Report]:
    """Replace every recognized MoE block of `model` in place; returns (model, report).

    recognizers: None = the built-ins; a Registry = exactly those; an iterable of Recognizer/MoEMapping =
    the built-ins plus these (yours win). on_unrecognized: "warn" (default), "error" (MoeccError with
    advice), "ignore" — for blocks that look like an MoE but are not captured. verify: check each
    replacement against its block on a probe input. defer(module) -> True: an unmatched block another
    capture path handles (transformers' experts interface, which reports its own refusals): not
    reported as unrecognized. The model itself may be a block: use the returned one.
    """
    if on_unrecognized not in ON_UNRECOGNIZED:
        raise MoeccError(f"on_unrecognized must be one of {ON_UNRECOGNIZED}, got {on_unrecognized!r}")
    registry = _registry(recognizers)
    report, done = Report(), []                       # done: paths whose subtree is settled
    for path, module in list(model.named_modules()):
        if _inside(path, done):
            continue
        if isinstance(module, MoE):                   # already canonical
            done.append(path)
            continue
        rec = registry.match(module)
        if rec is not None:
            model = _replace(model, path, module, rec, report, verify)
            done.append(path)
        elif defer is not None and defer(module):
            continue
        elif (why := looks_like_moe(module)) is not None:
            report.unrecognized.append((path, f"{type(module).__name__} looks like an MoE ({why}) but "
                                              f"no recognizer matches it"))
            done.append(path)
    _complain(report, on_unrecognized)
    return model, report


def _inside(path: str, done: list[str]) -> bool:
    return any(d == "" or path == d or path.startswith(d + ".") for d in done)


def _registry(recognizers) -> Registry:
    if recognizers is None:
        return default_registry()
    if isinstance(recognizers, Registry):
        return recognizers
    registry = default_registry()
    for item in recognizers:
        registry.register(item)
    return registry


def _replace(model: nn.Module, path: str, block: nn.Module, rec: Recognizer, report: Report,
             verify: bool) -> nn.Module:
    try:
        new = rec.build(block, path)
        if not isinstance(new, MoE):
            raise MoeccError(f"recognizer {rec.name!r} returned {type(new).__name__}; build must return a "
                             f"moecc.nn.MoE (e.g. RecognizedMoE) so the block becomes one moecc::moe node")
        new.train(block.training)
        err = probe(block, new, path) if verify else None
    except MoeccError as e:
        report.refused.append((path, rec.name, str(e)))
        return model
    report.recognized.append(Recognized(path, rec.name, type(block).__name__, new.spec, err))
    if path == "":
        return new
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def _complain(report: Report, on_unrecognized: str) -> None:
    problems = [f"{p}: {why}" for p, why in report.unrecognized]
    problems += [f"{p}: recognizer {rec!r} refused it: {why}" for p, rec, why in report.refused]
    if not problems or on_unrecognized == "ignore":
        return
    if on_unrecognized == "error":
        raise MoeccError(f"MoE block(s) not captured: {'; '.join(problems)}. To go on: {ADVICE}")
    for line in problems:
        warnings.warn(f"{line}; it stays as ordinary ops (correct, but no moecc MoE node). To capture it: "
                      f"{ADVICE}", UnrecognizedMoEWarning, stacklevel=3)
