"""ONNX backend: torch.export program ⇒ model.onnx, one kernel chosen per MoE layer.

    ExportedProgram (moe nodes)  ⇒  plan a kernel per layer (kernels.choose)
      ⇒  moecc.decompose: routing as ATen ops + one experts node per layer; a layer whose plan has
         the fused op keeps its moe node (always, or behind torch.cond(T < B, moe, route + experts))
      ⇒  torch.onnx.export(dynamo=True, custom_translation_table={experts: portable kernel,
                                                                 moe: com.microsoft::MoE})
      ⇒  model.onnx (weights inside unless > 2 GB), batch/sequence dims dynamic

Routing is exported by torch.onnx's own ATen translation: this backend defines no router. It emits
only the experts (backends/onnx/portable.py, standard ops) and, where exact, the fused op (which
routes inside onnxruntime). Experts nodes a capture made directly (no moe node) get a portable kernel.
Options: onnx_moe = portable | fused | auto (default auto: run-time dispatch by token count where the
fused op wins at decode only, kernels.py), onnx_kernel or kernel (force one kernel), tokens (plan one
kernel for this token count instead; portable mode plans for the example's), opset.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from moecc.complex_real import complex_to_real
from moecc.decompose import ALWAYS, EXPERTS_OP, decompose, experts_nodes
from moecc.errors import MoeccError
from moecc.ops import EXPERTS_ARGS, OP_ARGS, parse_spec
from moecc.pipeline import MOE_OP, moe_nodes
from moecc.spec import MoESpec
from moecc.quiet import torch_internal_deprecations

from ..base import KernelChoice, Lowered
from . import fused, kernels
TWO_GB = 2 ** 31
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
           torch.float64: "float64", torch.int64: "int64", torch.int32: "int32"}


def _shape(v) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in v.shape)


def layer_shapes(node: torch.fx.Node, names=OP_ARGS) -> dict:
    """{arg name: (shape with None for dynamic dims, dtype)} for the tensor arguments of a moe
    (or, names=EXPERTS_ARGS, an experts) node."""
    out = {}
    for name, arg in zip(names, node.args):
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            out[name] = (_shape(val), _DTYPES.get(val.dtype, str(val.dtype).removeprefix("torch.")))
    return out


def example_tokens(node: torch.fx.Node) -> int:
    """The token count of the example the program was exported with (the cost model's default)."""
    val = node.args[0].meta.get("val")
    try:
        return max(1, math.prod(d if isinstance(d, int) else int(d.node.hint) for d in val.shape[:-1]))
    except Exception:   # no hint recorded: plan for a modest batch
        return 64


def _choose(spec: MoESpec, node: torch.fx.Node, names, options: dict, mode: str) -> KernelChoice:
    tokens = int(options.get("tokens") or example_tokens(node))
    force = options.get("onnx_kernel") or options.get("kernel") or None
    return kernels.choose(spec, layer_shapes(node, names), mode, tokens, force,
                          dispatch_by_tokens=not options.get("tokens"))


def plan(program: torch.export.ExportedProgram, options: dict) -> dict[MoESpec, KernelChoice]:
    """{layer spec: KernelChoice} for every moe node, in graph order."""
    mode = options.get("onnx_moe") or "auto"
    out = {}
    for node, spec in moe_nodes(program.graph_module):
        named = spec if spec.name else spec.replace(name=node.name)
        out[spec] = _choose(named, node, OP_ARGS, options, mode)
    return out


def _experts_plan(program, layers: dict[MoESpec, KernelChoice], options: dict) -> tuple[dict, list]:
    """{layer spec: portable kernel} for every experts node of the decomposed program; the choices
    made here (experts nodes a capture made directly, without a moe node)."""
    kernel_of, more = {}, []
    for spec, choice in layers.items():
        kernel_of[spec] = kernels.split(choice.kernel)[1]
    for node, spec in experts_nodes(program.graph_module):
        key = spec
        if key not in kernel_of:
            mode = "fused" if options.get("onnx_moe") == "fused" else "portable"
            if mode == "fused":
                raise MoeccError(f"MoE layer {spec.name or node.name}: the fused com.microsoft::MoE needs the "
                                 f"layer's router logits, but it was captured at the experts level; use "
                                 f"--onnx-moe auto or portable")
            choice = _choose(spec, node, EXPERTS_ARGS, options, mode)
            kernel_of[key] = choice.kernel
            more.append(choice)
    return kernel_of, more


def translations(kernel_of: dict[MoESpec, str]) -> dict:
    """The custom translations: experts → its portable kernel; a kept moe node → com.microsoft::MoE."""
    def experts(xt, ids, weights, w_in, w_out, b_in=None, b_out=None, spec: str = "", kernel: str = ""):
        s = parse_spec(spec)
        return kernels.emit_experts(kernel_of[s], xt, ids, weights, w_in, w_out, b_in, b_out, s)

    def moe(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out, shared_gate,
            token_ids, spec: str, kernel: str = ""):
        return fused.moe(x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out,
                         shared_gate, token_ids, spec=parse_spec(spec))
    return {EXPERTS_OP: experts, MOE_OP: moe}


def _keep(layers: dict[MoESpec, KernelChoice]):
    def keep(spec: MoESpec) -> int:
        below = kernels.split(layers[spec].kernel)[0] if spec in layers else None
        return 0 if below is None else (ALWAYS if below == 0 else below)
    return keep


def tidy(model) -> None:
    """onnxscript's optimizer minus its pattern rewriter (quadratic in graph size: minutes for a few
    unrolled gather layers, and onnxruntime fuses at load anyway): inline, fold constants, drop dead nodes."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir
    common.InlinePass()(model)
    fold_constants_ir(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(), common.NameFixPass())(model)


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": str(v.dtype).lower() if v.dtype is not None else None,
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None}
            for v in values]


def _no_torchvision(record: logging.LogRecord) -> bool:
    return "torchvision is not installed" not in record.getMessage()


def _skip_torchvision_notes() -> None:
    """The exporter warns four times per export that torchvision (not a dependency) is absent: drop
    those records only, on the logger that writes them (torch resets its loggers' levels on import)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    if _no_torchvision not in log.filters:
        log.addFilter(_no_torchvision)


def lower(program: torch.export.ExportedProgram, out_dir: Path, options: dict) -> Lowered:
    out_dir = Path(out_dir)
    layers = plan(program, options)
    if any(kernels.split(c.kernel)[0] is not None for c in layers.values()):
        fused.register_schema()
    program = complex_to_real(decompose(program, keep=_keep(layers)))   # torch.onnx has no complex
    kernel_of, more = _experts_plan(program, layers, options)
    kw = {"opset_version": int(options["opset"])} if options.get("opset") else {}
    _skip_torchvision_notes()
    try:
        with torch_internal_deprecations():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=False,
                                             custom_translation_table=translations(kernel_of), **kw)
        tidy(onnx_program.model)
    except Exception as e:   # ours (wrapped by the exporter) as is; else the exporter's first line
        cause = e
        while cause is not None and not isinstance(cause, MoeccError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise MoeccError(f"ONNX export failed: {str(e).splitlines()[0]}") from e
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    onnx_program.save(out_dir / "model.onnx", external_data=weight_bytes > TWO_GB)
    files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith("model.onnx"))
    graph = onnx_program.model.graph
    opsets = dict(onnx_program.model.opset_imports)
    return Lowered(files=["model.onnx"] + [f for f in files if f != "model.onnx"],
                   kernels=list(layers.values()) + more,
                   notes={"opset": opsets.get(""), "opset_imports": opsets,
                          "inputs": _io(graph.inputs), "outputs": _io(graph.outputs),
                          "onnx_moe": options.get("onnx_moe") or "auto",
                          "external_data": weight_bytes > TWO_GB})
