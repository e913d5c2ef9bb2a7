"""`moecc simulate`: predicted step time of expert-parallel MoE layers on a cluster, with and without
the chunked all-to-all overlap, and the recommended overlap degree (moecc.distributed.costmodel).

Checked against published numbers before it is trusted (tests/test_simulate.py):

    DeepEP README, "Low-latency kernels with pure RDMA" table (H800, CX7 400 Gb/s InfiniBand,
    128 tokens per rank, hidden 7168, top-8, FP8 dispatch / BF16 combine), as published from
    2025-06-05 (commit de8cfca, "Update readme.") until EPv2 replaced it (2026-04-30, commit b306af0;
    last seen at 567632d). The earlier table (2025-04-21 e0eaaf9 .. 2025-04-27 1a0c8f6, pure RDMA
    without NVLink: 163..194 us dispatch) is kept as DEEPEP_LL_2025_04.

`calibrate_deepep` fits, per direction, the network link's latency α and bandwidth B from the EP16
and EP256 rows only (a node is 8 GPUs; NVLink 160 GB/s inside it, per the same README); the EP32,
EP64 and EP128 rows are then predictions. Bytes per token and choice are DeepEP's own accounting
(tests/test_low_latency.py): FP8 hidden + hidden/128 × 4 scale bytes + 16, BF16 hidden × 2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moecc.distributed.costmodel import (Cluster, Costs, LayerShape, Link, backward_pipeline, choose_degree,
                                         choose_degrees, layer_costs,
                                         pipeline, traffic, trace_probs, zipf_probs)
from moecc.distributed.ep_costs import runtime_costs, sample_ids
from moecc.errors import MoeccError

# EP: (dispatch us, dispatch GB/s, combine us, combine GB/s)
DEEPEP_LL_2025_06 = {8: (77, 98, 114, 127), 16: (118, 63, 195, 74), 32: (155, 48, 273, 53),
                     64: (173, 43, 314, 46), 128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}
DEEPEP_LL_2025_04 = {8: (163, 46, 318, 46), 16: (173, 43, 329, 44), 32: (182, 41, 350, 41),
                     64: (186, 40, 353, 41), 128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}
DEEPEP_TABLES = {"2025-06": DEEPEP_LL_2025_06, "2025-04": DEEPEP_LL_2025_04}
DEEPEP_HIDDEN, DEEPEP_TOKENS, DEEPEP_TOPK, DEEPEP_GPUS_PER_NODE = 7168, 128, 8, 8
DEEPEP_FP8_BYTES = (DEEPEP_HIDDEN + DEEPEP_HIDDEN / 128 * 4 + 16) / DEEPEP_HIDDEN   # per hidden element
DEEPEP_BF16_BYTES = 2.0
NVLINK = Link(latency=0.0, bandwidth=160e9)
CALIBRATION_EP = (16, 256)
H800_BF16_FLOPS = 600e12            # sustained dense GEMM, used only for layer predictions


def deepep_layer(ep: int, direction: str) -> LayerShape:
    b = DEEPEP_FP8_BYTES if direction == "dispatch" else DEEPEP_BF16_BYTES
    return LayerShape(tokens=DEEPEP_TOKENS, hidden=DEEPEP_HIDDEN, ffn=2048, experts=256,
                      top_k=DEEPEP_TOPK, gated=True, dispatch_bytes=b, combine_bytes=b)


def deepep_cluster(ep: int, inter: Link) -> Cluster:
    if ep % DEEPEP_GPUS_PER_NODE:
        raise MoeccError(f"DeepEP table: EP{ep} is not whole 8-GPU nodes")
    return Cluster(nodes=ep // DEEPEP_GPUS_PER_NODE, devices=DEEPEP_GPUS_PER_NODE,
                   intra=Link(inter.latency, NVLINK.bandwidth), inter=inter, flops=H800_BF16_FLOPS)


def _inter_bytes(ep: int, direction: str) -> float:
    layer = deepep_layer(ep, direction)
    tr = traffic(layer, deepep_cluster(ep, Link(0.0, 1.0)), zipf_probs(layer.experts, 0.0))
    return tr.inter_rows * layer.hidden * layer.dispatch_bytes


def calibrate_deepep(table: dict, points=CALIBRATION_EP) -> dict[str, Link]:
    """Per direction, the network Link (α, B) through the table's latencies at `points` (exact where
    the network leg is the slower one, as in the 2025-06 table; the 2025-04 combine at EP16 is
    NVLink-bound in the model, 2% above the table)."""
    links = {}
    for col, direction in ((0, "dispatch"), (2, "combine")):
        A = np.array([[1.0, _inter_bytes(ep, direction)] for ep in points])
        t = np.array([table[ep][col] * 1e-6 for ep in points])
        alpha, inv_b = np.linalg.lstsq(A, t, rcond=None)[0]
        if not (alpha >= 0 and inv_b > 0):
            raise MoeccError(f"DeepEP calibration gave a non-physical link (α={alpha}, 1/B={inv_b})")
        links[direction] = Link(latency=float(alpha), bandwidth=float(1.0 / inv_b))
    return links


def predict_deepep(ep: int, links: dict[str, Link]) -> tuple[float, float]:
    """(dispatch us, combine us) predicted at EP `ep` by the calibrated model."""
    out = []
    for direction in ("dispatch", "combine"):
        c = layer_costs(deepep_layer(ep, direction), deepep_cluster(ep, links[direction]))
        out.append((c.dispatch if direction == "dispatch" else c.combine) * 1e6)
    return out[0], out[1]


def deepep_check(table_name: str = "2025-06") -> list[dict]:
    """Rows: EP, published and predicted times, relative error, whether the row was calibrated on."""
    table = DEEPEP_TABLES[table_name]
    links = calibrate_deepep(table)
    rows = []
    for ep in sorted(table):
        if ep < 2 * DEEPEP_GPUS_PER_NODE:
            continue                                           # one node: NVLink only, not modelled here
        pd, pc = predict_deepep(ep, links)
        d, c = table[ep][0], table[ep][2]
        rows.append({"ep": ep, "dispatch_us": d, "dispatch_pred_us": pd, "dispatch_err": pd / d - 1,
                     "combine_us": c, "combine_pred_us": pc, "combine_err": pc / c - 1,
                     "calibrated": ep in CALIBRATION_EP})
    return rows


@dataclass(frozen=True)
class LayerPrediction:
    name: str
    costs: Costs
    serial: float                   # step time without overlap (s): every collective waited at once
    best: object                    # Schedule at the recommended degree
    forced: object | None           # Schedule at --overlap-degree, if given
    train: tuple | None = None      # training: (forward, backward) Schedules at the recommended
                                    # (degree, backward degree) (costmodel.choose_degrees)
    train_serial: float = 0.0       # forward + backward without overlap (s)


def predict_costs(c: Costs, cluster: Cluster, degree: int | None = None, name: str = "layer",
                  train: bool = False) -> LayerPrediction:
    serial = pipeline(c, 1, cluster.chunk_overhead, overlap=False).step
    best = choose_degree(c, cluster.chunk_overhead)
    forced = pipeline(c, degree, cluster.chunk_overhead) if degree else None
    if not train:
        return LayerPrediction(name, c, serial, best, forced)
    both = choose_degrees(c, cluster.chunk_overhead, degree=degree)
    return LayerPrediction(name, c, serial, best, forced, both,
                           serial + backward_pipeline(c, 1, chunk_overhead=cluster.chunk_overhead, overlap=False).step)


def predict_layer(layer: LayerShape, cluster: Cluster, probs=None, degree: int | None = None,
                  name: str = "layer", ids=None, train: bool = False, placement=None) -> LayerPrediction:
    """ids [W, T, k]: moecc's runtime accounting on that routing (ep_costs), on `placement` (a
    LayerPlacement; None: contiguous experts); else one row per (token, choice) with expected loads
    from probs (DeepEP's low-latency accounting)."""
    c = (runtime_costs(layer, cluster, ids, placement=placement) if ids is not None
         else layer_costs(layer, cluster, probs))
    return predict_costs(c, cluster, degree, name, train)


def load_placements(path: str, cluster: Cluster, layer: LayerShape, names: list[str],
                    traced: bool = False) -> list:
    """placement.json (`moecc plan`) -> its LayerPlacements: one (serving every simulated layer) or
    one per simulated layer `names` (by position), checked against the cluster, the layer and
    (traced: the names are a trace's layers) the trace's layer names."""
    from moecc.distributed.layout import LayerPlacement
    from moecc.passes.placement import load_plan

    plan = load_plan(path)
    topo = plan.topology
    if (topo.nodes, topo.devices_per_node) != (cluster.nodes, cluster.devices):
        raise MoeccError(f"placement {path} is for {topo.nodes} node(s) x {topo.devices_per_node} devices, "
                         f"the cluster is --nodes {cluster.nodes} x --devices {cluster.devices}: give the "
                         "cluster the plan was made for, or plan again with its topology")
    if len(plan.layers) not in (1, len(names)):
        raise MoeccError(f"placement {path} has {len(plan.layers)} layers, the simulation {len(names)} "
                         f"({'the trace' if len(names) > 1 else '--layers'}): it is for another model")
    out = [LayerPlacement.from_plan(plan, j) for j in range(len(plan.layers))]
    for lp, name in zip(out, names):
        if lp.num_experts != layer.experts:
            raise MoeccError(f"placement {path}: layer {lp.name} places {lp.num_experts} experts but "
                             f"--experts is {layer.experts}")
        if traced and len(out) > 1 and lp.name != name:
            raise MoeccError(f"placement {path}: its layer {lp.name!r} meets the trace's {name!r}: "
                             "plan on the same trace")
    return out


def layer_routing(layer: LayerShape, world: int, skew: float, trace_path: str | None, seed: int = 0):
    """One (name, probs [E], ids [W, T, k]) per layer: the trace's layers (its tokens dealt to the
    ranks in order, repeated if too few), or one layer routed top-k from Zipf(skew) popularities."""
    if not trace_path:
        return [("layer", zipf_probs(layer.experts, skew),
                 sample_ids(world, layer.tokens, layer.experts, layer.top_k, skew, seed))]
    from moecc.passes.placement.trace import load_trace
    tr = load_trace(trace_path)
    if tr.num_experts != layer.experts:
        raise MoeccError(f"trace {trace_path} has {tr.num_experts} experts but --experts is {layer.experts}; "
                         "give --experts to match the trace")
    if tr.expert_ids.shape[2] != layer.top_k:
        layer_k = tr.expert_ids.shape[2]
        raise MoeccError(f"trace {trace_path} has top-{layer_k} routing but --top-k is {layer.top_k}")
    need = world * layer.tokens
    out = []
    for i, name in enumerate(tr.layers):
        ids = tr.expert_ids[i].astype(np.int64)
        ids = np.resize(ids, (need, ids.shape[1])).reshape(world, layer.tokens, -1)
        out.append((name, trace_probs(tr.expert_ids[i], tr.num_experts), ids))
    return out


def simulate(layer: LayerShape, cluster: Cluster, skew: float = 0.0, trace: str | None = None,
             layers: int = 1, degree: int | None = None, accounting: str = "moecc",
             train: bool = False, placement: str | None = None) -> list[LayerPrediction]:
    """Per MoE layer predictions; a trace gives its own layers, else `layers` identical ones (with a
    placement of several layers: one per layer, each on its own). accounting: "moecc" (this
    runtime's messages on sampled / traced routing) or "choice" (a row per (token, choice), expected
    loads: DeepEP's low-latency kernels). placement: a placement.json (`moecc plan`; default:
    contiguous experts), which ranks compute each (token, expert) and so the traffic and the loads."""
    if accounting not in ("moecc", "choice"):
        raise MoeccError(f"accounting must be moecc or choice, got {accounting!r}")
    if placement and accounting != "moecc":
        raise MoeccError("a placement needs --accounting moecc (the choice accounting assumes "
                         "expected loads on contiguous experts)")
    routed = layer_routing(layer, cluster.validate().world, skew, trace)
    places = [None]
    if placement:
        names = [r[0] for r in routed] if trace else [f"layer{i}" for i in range(layers)]
        places = load_placements(placement, cluster, layer, names, bool(trace))
        if len(places) > len(routed):            # --layers N, a plan of N layers: each its own
            routed = [(name, p, ids) for name in names for _, p, ids in routed]
    places = places * (len(routed) // len(places))                 # one placement serves every layer
    preds = [predict_layer(layer, cluster, p, degree, name, ids if accounting == "moecc" else None, train, lp)
             for (name, p, ids), lp in zip(routed, places)]
    if not trace and layers > 1 and len(preds) == 1:
        preds = [replace(preds[0], name=f"layer{i}") for i in range(layers)]
    return preds


__all__ = ["DEEPEP_TABLES", "calibrate_deepep", "predict_deepep", "deepep_check", "simulate",
           "predict_layer", "load_placements", "LayerPrediction"]
