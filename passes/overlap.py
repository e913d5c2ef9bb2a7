"""Overlap: each expert-parallel experts layer split into d token chunks, one chunk's all-to-all in
flight while another's experts compute (moecc.distributed.overlap.moe_layer), d per layer from the
cost model.

    experts(x [T,H], ids, weights, ...)  ⇒  moe_layer(..., degree=d)      (d in 1..8, per layer)

    plan(gm, {"ep": W, "overlap_degree": d | None, "constants": Measured | dict | None})
        -> OverlapPlan (frozen, JSON: schedule.json)
    plan_layers(layers, world, constants, degree) -> OverlapPlan     at launch, from the constants
        measured on the ranks at start-up (moecc.distributed.probe.measure)
    apply(module, plan) -> n      sets `overlap_degree` on each EP experts module (by layer name)

The choice: the smallest degree predicted within DEGREE_TOLERANCE (5%) of the fastest
(costmodel.choose_degree; why 5%: its docstring, measured on the overlap grids) on balanced routing of
the layer's tokens per rank, with this runtime's message accounting (ep_costs);
`overlap_degree` (`--overlap-degree`) overrides it for every layer. Training (plan_layers(...,
training=True), moecc.distributed.schedule.configure(..., training=True)): the degree and the
backward's degree (a divisor of it: the backward merges forward chunks) are chosen together for the
fastest predicted forward + backward (costmodel.choose_degrees); `backward_degree` overrides the latter. Without measured constants (at
compile time: no process group yet) the layers are recorded with degree "auto" and no predictions;
with them, schedule.json holds each layer's predicted serial and overlapped step time, hidden
fraction and degree. The graph itself is not rewritten: the chunked schedule is a runtime of the EP
experts module (moecc.distributed.overlap), so one artifact runs at any degree.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx

from moecc.errors import MoeccError
from moecc.pipeline import PassResult

__all__ = ["LayerShape", "OverlapPlan", "LayerSchedule", "plan", "plan_layers", "apply", "make"]
log = logging.getLogger("moecc.passes.overlap")
FORMAT = "moecc.schedule/1"
GRAPH_META = "moecc.overlap"


@dataclass(frozen=True)
class LayerSchedule:
    name: str
    tokens: int                               # tokens per rank the prediction is for
    degree: int | str                         # 1..8, or "auto" (chosen at start-up)
    forced: bool = False
    predicted_serial_s: float | None = None   # no overlap
    predicted_step_s: float | None = None     # at `degree`
    predicted_hidden: float | None = None     # hidden comm / comm at `degree`
    # training: the backward's degree (a divisor of `degree`; None: inference, the backward at `degree`)
    backward_degree: int | str | None = None
    predicted_backward_serial_s: float | None = None
    predicted_backward_s: float | None = None
    predicted_backward_hidden: float | None = None


@dataclass(frozen=True)
class OverlapPlan:
    world: int
    layers: tuple
    constants: dict | None = None

    def degree(self, name: str) -> int | None:
        for lay in self.layers:
            if lay.name == name and isinstance(lay.degree, int):
                return lay.degree
        return None

    def backward_degree(self, name: str) -> int | None:
        for lay in self.layers:
            if lay.name == name and isinstance(lay.backward_degree, int):
                return lay.backward_degree
        return None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "world": self.world, "constants": self.constants,
                           "layers": [asdict(lay) for lay in self.layers]}, indent=1)

    @staticmethod
    def from_json(text: str) -> "OverlapPlan":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise MoeccError(f"schedule.json: format {d.get('format')!r}, expected {FORMAT!r}")
        return OverlapPlan(int(d["world"]), tuple(LayerSchedule(**lay) for lay in d["layers"]),
                           d.get("constants"))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


@dataclass(frozen=True)
class LayerShape:
    """What the choice needs of one layer (moecc.spec.MoESpec fields + tokens per rank)."""
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    gated: bool
    shared_ffn: int = 0
    bytes: int = 4


def _check_degree(degree, what: str = "--overlap-degree") -> int | None:
    if degree is None:
        return None
    if not isinstance(degree, int) or not 1 <= degree <= 8:
        raise MoeccError(f"{what} must be an integer in 1..8, got {degree!r}")
    return degree


def plan_layers(layers: list[LayerShape], world: int, constants=None, degree: int | None = None,
                skew: float = 0.0, seed: int = 0, training: bool = False,
                backward_degree: int | None = None) -> OverlapPlan:
    """constants: moecc.distributed.probe.Measured (or its dict), or None (degree "auto").
    training: the degree and the backward degree (a divisor of it) chosen together for the fastest
    predicted forward + backward (costmodel.choose_degrees); backward_degree overrides the latter."""
    from moecc.distributed import costmodel as cm
    from moecc.distributed.ep_costs import measured_costs, sample_ids

    degree = _check_degree(degree)
    if backward_degree is not None:
        if not training:
            raise MoeccError("a backward overlap degree needs training=True (inference runs no backward)")
        backward_degree = _check_degree(backward_degree, "backward overlap degree")
        if degree is not None and degree % backward_degree:
            raise MoeccError(f"backward overlap degree {backward_degree} must divide the overlap degree {degree}")
    if constants is not None and not isinstance(constants, dict):
        constants = constants.to_dict()
    out = []
    for lay in layers:
        if constants is None:
            out.append(LayerSchedule(lay.name, lay.tokens, degree or "auto", degree is not None,
                                     backward_degree=(backward_degree or "auto") if training else None))
            continue
        shape = cm.LayerShape(lay.tokens, lay.hidden, lay.ffn, lay.experts, lay.top_k, lay.gated,
                              lay.shared_ffn, lay.bytes, lay.bytes)
        ids = sample_ids(world, lay.tokens, lay.experts, lay.top_k, skew, seed)
        cluster, c = measured_costs(shape, world, ids, constants)
        # the graph's shared expert runs whole between the layer's two nodes (expert_parallel.apply)
        chosen = (cm.pipeline(c, degree, cluster.chunk_overhead, shared_blocks=1) if degree
                  else cm.choose_degree(c, cluster.chunk_overhead, shared_blocks=1))
        serial = cm.pipeline(c, 1, cluster.chunk_overhead, overlap=False)
        back, extra = None, {}
        if training:
            chosen, back = cm.choose_degrees(c, cluster.chunk_overhead, shared_blocks=1, degree=degree,
                                             backward_degree=backward_degree)
            extra = dict(backward_degree=back.degree, predicted_backward_s=back.step,
                         predicted_backward_hidden=back.overlap,
                         predicted_backward_serial_s=cm.backward_pipeline(c, 1, chunk_overhead=cluster.chunk_overhead, overlap=False).step)
        log.info("overlap: layer %s d=%d%s%s (predicted %.3g ms vs %.3g ms serial)", lay.name,
                 chosen.degree, f", backward d={back.degree}" if back else "", " (forced)" if degree else "",
                 chosen.step * 1e3, serial.step * 1e3)
        out.append(LayerSchedule(lay.name, lay.tokens, chosen.degree, degree is not None, serial.step,
                                 chosen.step, chosen.overlap, **extra))
    return OverlapPlan(world, tuple(out), constants)


def experts_layers(gm: fx.GraphModule) -> list[LayerShape]:
    """One LayerShape per MoE layer (moecc::moe or moecc::experts node, graph order; tokens: the
    example's, per rank = all)."""
    from moecc.ops import parse_spec
    from moecc.passes.expert_parallel import _arg, layer_nodes
    out = []
    for n in layer_nodes(gm):
        spec = parse_spec(_arg(n, "spec"))
        val = n.args[0].meta.get("val")                       # x: [T, H] (experts) or [..., H] (moe)
        T = 0
        if val is not None:
            T = 1
            for d in val.shape[:-1]:
                T *= int(d.node.hint) if hasattr(d, "node") and d.node.hint is not None else int(d) if isinstance(d, int) else 0
        elt = val.element_size() if val is not None else 4
        out.append(LayerShape(spec.name or n.name, T, spec.hidden, spec.ffn, spec.num_experts,
                              spec.top_k, spec.gated, spec.shared_ffn, elt))
    return out


def plan(gm: fx.GraphModule, options: dict) -> OverlapPlan:
    world = options.get("ep")
    if not world or world < 2:
        raise MoeccError("overlap needs expert parallelism: give --ep N (N >= 2)")
    layers = experts_layers(gm)
    if not layers:
        raise MoeccError("overlap: the graph has no MoE layers (torch.ops.moecc.moe / experts); run "
                         "expert_parallel on an MoE model")
    return plan_layers([LayerShape(**{**asdict(lay), "tokens": max(lay.tokens // world, 1)}) for lay in layers],
                       world, options.get("constants"), options.get("overlap_degree"))


def apply(module: torch.nn.Module, p: OverlapPlan) -> int:
    """Set `overlap_degree` (and, planned for training, `overlap_backward_degree`) on every submodule
    with a placement whose layer the plan names."""
    n = 0
    for m in module.modules():
        name = getattr(getattr(m, "placement", None), "name", None)
        if name is not None and p.degree(name) is not None:
            m.overlap_degree = p.degree(name)
            m.overlap_backward_degree = p.backward_degree(name)
            n += 1
    return n


def make(options: dict):
    def run(gm: fx.GraphModule) -> PassResult:
        p = plan(gm, options)
        gm.meta[GRAPH_META] = p.to_json()                 # the artifact writes it as schedule.json
        return PassResult(gm, False, {"layers_scheduled": len(p.layers)})
    return run
