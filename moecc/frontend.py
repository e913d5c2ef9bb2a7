"""Capture: nn.Module → torch.export → unlifted ATen fx.GraphModule, known MoE blocks as ONE node.

    model (+ recognizers replace known MoE blocks by moecc.nn modules)
      → torch.export.export(dynamic batch/seq dims)  → ExportedProgram
      → .module()                                    → fx.GraphModule (params as get_attr), passes run here
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import MoeccError
from .inputs import InputSpec, describe_inputs, dynamic_shapes
from .pipeline import annotate
from .quiet import export_logs_dropped

log = logging.getLogger("moecc.capture")


@dataclass
class Captured:
    """A captured model: the graph passes rewrite, and what is needed to export it again."""

    gm: fx.GraphModule
    example_inputs: tuple
    dynamic_shapes: tuple | None
    inputs: list[InputSpec]
    source: str = "model"
    recognized: dict = field(default_factory=dict)      # the recognizers' report (to_dict)

    def export(self) -> torch.export.ExportedProgram:
        return export(self.gm, self.example_inputs, self.dynamic_shapes, self.source)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def export(module: torch.nn.Module, example_inputs: tuple, dyn, source: str) -> torch.export.ExportedProgram:
    try:
        with export_logs_dropped():      # a failure is reported below in one line, not in torch's log
            return torch.export.export(module, example_inputs, dynamic_shapes=dyn, strict=False)
    except MoeccError:
        raise
    except Exception as e:
        raise MoeccError(f"could not capture {source} with torch.export: {type(e).__name__}: "
                         f"{_first_line(e)}") from e


def _recognize(model: torch.nn.Module, recognizers, defer) -> tuple[torch.nn.Module, dict]:
    from .recognize import recognize
    model, report = recognize(model, recognizers, defer=defer)
    return model, report.to_dict()


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.recompile()


def capture(model: torch.nn.Module, example_inputs, dynamic: bool = True, source: str = "model",
            recognize: bool = True, recognizers=None, experts_interface: bool = True) -> Captured:
    """Export `model` on `example_inputs` with dynamic token dims; MoE blocks it recognizes become
    one moecc::moe node each (`recognizers`: a moecc.recognize Registry of the user's own, or None
    for the built-in families). The recognizers win where they match (their node carries the router,
    which passes may change); every other transformers 5.x experts module is captured through the
    ExpertsInterface (`experts_interface`) as one moecc::experts node behind the family's own router,
    and so are the experts modules outside it that moecc.recognize.experts_adapters knows."""
    if not isinstance(model, torch.nn.Module):
        raise MoeccError(f"{source}: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise MoeccError(f"{source}: example inputs must be a tensor or a non-empty tuple of tensors, got "
                         f"{type(example_inputs).__name__} (a factory returns (model, (tokens,)))")
    example_inputs = tuple(example_inputs)
    try:
        model.eval()
    except NotImplementedError:          # an ExportedProgram's .module() (already a graph) has no eval()
        pass
    recognized = {}
    interface = recognize and experts_interface
    if recognize:
        model, recognized = _recognize(model, recognizers, defer=_interface_defers if interface else None)
    dyn = dynamic_shapes(example_inputs, dynamic)
    with _experts_interface(model, interface) as reports:
        program = export(model, example_inputs, dyn, source)
    for key, report in reports.items():
        if report.captured or report.refused:
            recognized[key] = report.to_dict()
    inputs = describe_inputs(program)
    _warn_fixed_dims(inputs, dyn, source)
    gm = program.module()
    _drop_guards(gm)
    _sorted_topk(gm)
    from .recognize.experts_interface import annotate_experts
    return Captured(annotate_experts(annotate(gm)), example_inputs, dyn, inputs, source, recognized)


def _warn_fixed_dims(inputs, dyn, source: str) -> None:
    """A dim asked dynamic that export fixed (Dim.AUTO found the model's code depends on its value, e.g.
    a Python loop over the sequence as in Mamba's torch scan): the graph runs at that size only."""
    fixed = [f"{spec.name} dim {d} = {spec.shape[d]}" for spec, want in zip(inputs, dyn or ())
             if want for d in want if d < len(spec.shape) and isinstance(spec.shape[d], int)]
    if fixed:
        log.warning("capture: %s: export fixed %s (the model's code depends on the size, e.g. a Python loop "
                    "over it); the captured graph accepts only that size", source, ", ".join(fixed))


def _sorted_topk(gm: fx.GraphModule) -> None:
    """topk(sorted=False) ⇒ topk(sorted=True): an unsorted topk promises no order, so the sorted one is
    a valid implementation of it, and every exporter handles it (TVM's importer refuses sorted=False,
    which DeepSeek-style group-limited routers use)."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.topk.default:
            if len(node.args) > 4 and node.args[4] is False:
                node.update_arg(4, True)
                changed += 1
            elif node.kwargs.get("sorted") is False:
                node.update_kwarg("sorted", True)
                changed += 1
    if changed:
        log.debug("capture: %d topk(sorted=False) made sorted", changed)
        gm.recompile()


def _interface_defers(module: torch.nn.Module) -> bool:
    from .recognize.experts_adapters import contains_adapted
    from .recognize.experts_interface import contains_hf_experts
    return contains_hf_experts(module) or contains_adapted(module)


@contextlib.contextmanager
def _experts_interface(model: torch.nn.Module, enabled: bool):
    """{"experts_interface": report, "experts_adapters": report} while exporting (none when disabled)."""
    if not enabled:
        yield {}
        return
    from .recognize import experts_adapters, experts_interface
    with experts_interface.capturing(model) as iface, experts_adapters.capturing(model) as adapters:
        yield {"experts_interface": iface, "experts_adapters": adapters}
