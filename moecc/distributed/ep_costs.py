"""Costs of moecc's own expert-parallel runtime (moecc.distributed.ep) for a given routing: exact
message sizes counted from the expert ids, for the cost model's schedule (costmodel.pipeline).

    ids [W, T, k] (global expert ids per rank's tokens; -1 empty)  ⇒  Costs

What moecc.distributed.ep sends per layer call (or per chunk): split sizes (one all_gather of
5 + 2W·d int64 per rank: one α, its bytes almost nothing), a dispatch of ONE all-to-all — hidden rows once per (token,
destination rank) and per (token, slot) its (weight, local id, row) as 3 int64, packed — and a
combine of one all-to-all, an output row per (token, slot). Each collective takes
alpha + max over ranks of max(sent, received) bytes over the link (own rows free; intra- vs
inter-node links as in costmodel.a2a_time); the busiest rank's received pairs set the GEMM time.
Routing without a trace: top-k sampled without replacement from Zipf popularities (Gumbel top-k).
"""
from __future__ import annotations

import numpy as np

from moecc.distributed.costmodel import (Cluster, Costs, LayerShape, Link, a2a_time, expert_time,
                                         shared_time, zipf_probs)

DISPATCH_MSGS, COMBINE_MSGS = 1, 1
META_BYTES = 24         # per pair in a dispatch: weight (float64), local id, row (int64)


def sample_ids(world: int, tokens: int, experts: int, top_k: int, skew: float, seed: int = 0,
               permute: bool = False, draw_seed: int | None = None) -> np.ndarray:
    """[W, T, k] expert ids: k distinct experts per token, drawn ∝ Zipf(skew) popularity (expert 0
    hottest unless permute shuffles which expert is hot); draw_seed: other tokens from the same
    popularities (seed fixes which expert is hot)."""
    rng = np.random.default_rng(seed)
    logp = np.log(zipf_probs(experts, skew))
    if permute:
        logp = logp[rng.permutation(experts)]
    if draw_seed is not None:
        rng = np.random.default_rng([seed, draw_seed])
    keys = logp + rng.gumbel(size=(world * tokens, experts))
    ids = np.argsort(-keys, axis=1)[:, :top_k]
    return ids.reshape(world, tokens, top_k).astype(np.int64)


def _matrices(ids: np.ndarray, experts: int, placement=None):
    """-> pairs [W, W], rows [W, W] (source, destination), received pairs per rank [W]. placement: a
    moecc.distributed.layout.LayerPlacement (replica shares, one node), sent by its exact dispatch
    rule (placement metrics' `dispatch`, tokens numbered rank-major); None: contiguous experts."""
    W, T, k = ids.shape
    if placement is None:
        dest = np.where(ids >= 0, ids * W // experts, -1)                     # contiguous placement
    else:
        from moecc.passes.placement.metrics import dispatch
        G = placement.devices_per_node
        dest = np.stack([dispatch(placement.share, ids[r], placement.local, np.full(T, r // G), G,
                                  np.arange(r * T, (r + 1) * T)) for r in range(W)])
    pairs = np.zeros((W, W), np.int64)
    rows = np.zeros((W, W), np.int64)
    for r in range(W):
        d = dest[r][dest[r] >= 0]
        pairs[r] = np.bincount(d, minlength=W)
        hit = np.zeros((T, W), bool)
        tt = np.repeat(np.arange(T), k).reshape(T, k)
        ok = dest[r] >= 0
        hit[tt[ok], dest[r][ok]] = True
        rows[r] = hit.sum(0)
    return pairs, rows, pairs.sum(0)


def _collective(cluster: Cluster, mat: np.ndarray, row_bytes: float = 1.0) -> float:
    """Bottleneck time of one all-to-all whose rank i sends mat[i, j] rows of row_bytes to rank j."""
    W, G = mat.shape[0], cluster.devices
    node = np.arange(W) // G
    same = node[:, None] == node[None, :]
    off = ~np.eye(W, dtype=bool)
    worst = 0.0
    for r in range(W):
        intra = max(mat[r, same[r] & off[r]].sum(), mat[same[:, r] & off[:, r], r].sum()) * row_bytes
        inter = max(mat[r, ~same[r]].sum(), mat[~same[:, r], r].sum()) * row_bytes
        worst = max(worst, a2a_time(cluster, intra, inter))
    return worst


def _volume(mat: np.ndarray, row_bytes: float = 1.0) -> float:
    """The most bytes one rank sends to or receives from the others in an all-to-all whose rank i
    sends mat[i, j] rows of row_bytes to rank j."""
    off = mat * ~np.eye(mat.shape[0], dtype=bool)
    return float(np.maximum(off.sum(1), off.sum(0)).max()) * row_bytes


def runtime_costs(layer: LayerShape, cluster: Cluster, ids: np.ndarray, index_bytes: int = 8,
                  plan: float = 0.0, plan_fixed: float = 0.0, sums: float = 0.0,
                  sums_fixed: float = 0.0, unpack: float = 0.0, unpack_fixed: float = 0.0,
                  wake: float = 0.0, floor: float = 0.0, placement=None, pack: float = 0.0,
                  pack_fixed: float = 0.0, bwd_flops: float = 0.0, bwd_chunk: float = 0.0,
                  grads: float = 0.0, grads_fixed: float = 0.0, cold: dict | None = None,
                  steal: float = 0.0, steal_fixed: float = 0.0) -> Costs:
    """Costs of one layer call of moecc's runtime with routing ids [W, T, k] (W = cluster.world).
    plan/sums/unpack: measured compute of building the send layout, summing the combine and reading
    a received dispatch (s, all tokens of a rank), and their fixed cost per chunk; wake: what a wait
    that blocks costs beyond the collective (probe: a lone exchange's time minus alpha); floor: the
    least time a collective takes (probe: an exchange's while the cores compute); bwd_flops /
    bwd_chunk / grads / grads_fixed: the backward's measured experts throughput (forward FLOPs per s),
    fixed cost per call, and token sums (0: the cost model's defaults, costmodel.backward_pipeline);
    cold: Costs' cold_* penalties of a compute step after a wait that blocked (all tokens / per call);
    steal / steal_fixed: the compute time an exchange issued during compute takes from it, per byte
    (of the bottleneck rank's volume) and per call."""
    cluster.validate()
    layer.validate(cluster.world)
    pairs, rows, received = _matrices(np.asarray(ids), layer.experts, placement)
    H, W = layer.hidden, cluster.world
    b = layer.dispatch_bytes
    disp_bytes = rows * (H * b) + pairs * META_BYTES                            # one packed message
    dispatch = _collective(cluster, disp_bytes)
    combine = _collective(cluster, pairs, H * layer.combine_bytes)
    head, per_chunk = (W - 1) * (5 + 2 * W) * index_bytes, (W - 1) * 2 * W * index_bytes
    sizes = a2a_time(cluster, head, head)
    alpha = a2a_time(cluster, 0.0, 0.0)
    experts = expert_time(layer, cluster, float(received.max()))
    return Costs(dispatch=dispatch, combine=combine, experts=experts,
                 shared=shared_time(layer, cluster), alpha=alpha,
                 dispatch_msgs=DISPATCH_MSGS, combine_msgs=COMBINE_MSGS, sizes=sizes, plan=plan,
                 plan_fixed=plan_fixed, sums=sums, sums_fixed=sums_fixed, unpack=unpack,
                 unpack_fixed=unpack_fixed, sizes_chunk=a2a_time(cluster, per_chunk, per_chunk) - alpha,
                 wake=wake, floor=floor, pack=pack, pack_fixed=pack_fixed,
                 experts_backward=experts * cluster.flops / bwd_flops if bwd_flops > 0 else 0.0,
                 backward_fixed=bwd_chunk, back=_collective(cluster, pairs, (H + 1) * layer.combine_bytes),
                 weights_back=_collective(cluster, pairs, layer.combine_bytes), grads=grads,
                 grads_fixed=grads_fixed, **(cold or {}), steal_fixed=steal_fixed,
                 dispatch_steal=steal * _volume(disp_bytes), combine_steal=steal * _volume(pairs, H * layer.combine_bytes),
                 back_steal=steal * _volume(pairs, (H + 1) * layer.combine_bytes))


COLD = ("cold_exp", "cold_exp_fixed", "cold_sums", "cold_sums_fixed", "cold_plan", "cold_plan_fixed",
        "cold_pack", "cold_pack_fixed")
"""The probe's cold penalties (probe.Measured: s per token and per call), Costs' fields of the same names."""


def measured_costs(layer: LayerShape, world: int, ids: np.ndarray, k: dict,
                   placement=None) -> tuple[Cluster, Costs]:
    """(one-node cluster, Costs) of this runtime on `world` ranks from the constants the probe
    measured at start-up (moecc.distributed.probe.Measured.to_dict(); the fields it lacks count 0)."""
    link = Link(k["alpha"], 1.0 / k["beta"] if k["beta"] > 0 else float("inf"))
    cluster = Cluster(1, world, link, link, k["flops"], k["chunk"])
    T = layer.tokens
    return cluster, runtime_costs(layer, cluster, ids, plan=k["plan"] * T, plan_fixed=k["plan_fixed"],
                                  sums=k["sums"] * T, sums_fixed=k["sums_fixed"],
                                  unpack=k.get("unpack", 0.0) * T, unpack_fixed=k.get("unpack_fixed", 0.0),
                                  wake=max(k.get("lone", 0.0) - k["alpha"], 0.0), floor=k.get("busy", 0.0),
                                  placement=placement, pack=k.get("pack", 0.0) * T,
                                  pack_fixed=k.get("pack_fixed", 0.0), bwd_flops=k.get("bwd_flops", 0.0),
                                  bwd_chunk=k.get("bwd_chunk", 0.0), grads=k.get("grads", 0.0) * T,
                                  grads_fixed=k.get("grads_fixed", 0.0),
                                  cold={f: k.get(f, 0.0) * (1 if f.endswith("_fixed") else T) for f in COLD},
                                  steal=k.get("steal", 0.0), steal_fixed=k.get("steal_fixed", 0.0))
