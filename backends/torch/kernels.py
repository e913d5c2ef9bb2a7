"""PyTorch experts kernels: seven ways to compute `moecc.ops.experts_reference`, each with a checker and a cost.

    fn(xt [T, H], ids [T, S] int64 (-1 = empty slot), weights [T, S], w_in [E', R, H], w_out [E', H, F],
       b_in?, b_out?, spec=MoESpec) -> y [T, H]

    torch.loop          for e in E': tokens of e → index_select → ffn → index_add_          (baseline)
                        (loop, grouped_gemm and gather run an expert's GEMMs through gemm.linear, the
                        same GEMM forms, and split whole experts over intra-op threads (parallel.py):
                        they differ in gathering and scattering only)
    torch.grouped_gemm  ONE sort of the (token, slot) pairs by expert → per expert's contiguous
                        segment: its rows (gathered once for all if [N, H] fits in cache), GEMM →
                        activation → GEMM (intermediates stay in cache), weighted index_add_  (prefill);
                        when no expert has more than skinny.moe_max_rows (float32): the routed experts in
                        ONE skinny.moe C call per thread (counting sort, gather, GEMM, activation, GEMM,
                        weighted scatter, all in C; no per-expert Python or torch ops: decode and
                        fine-grained experts at T = 1..64)
    torch.packed_gemm   torch.grouped_gemm with each expert's weights in MKL's packed layout, packed
                        once per weight tensor and cached (packed.py; F.linear's bits, also where
                        grouped_gemm would use oneDNN): where an expert's rows go to a BLAS GEMM
                        (> skinny.MAX_M rows at 1 thread), the weights are not repacked per call
    torch.dnn_gemm      the same on oneDNN's reordered weights (packed.dnn_linear; not F.linear's bits):
                        where MKL takes a slower path than oneDNN (AVX-512 AMD: 2-3.6x at m ≥ 64),
                        chosen by the measured machine.constants()["dnn_gain"]
    torch.grouped_mm    grouped_gemm's sort, then ONE gather, two torch._grouped_mm ops over all experts
                        (MKL sgemm per expert inside ATen), the k slots summed in ascending expert order
                        by a gather + adds (grouped_mm.py; no per-expert Python op, no scatter); float32
                        with H, R, F multiples of 4, else grouped_gemm runs
    torch.gather        per (token, slot): ffn on views of the chosen expert's weights; reads only
                        the k chosen experts, copies no weight                                (decode);
                        bf16/fp16: grouped_gemm (a row's GEMM alone is not its bits in a batch on every CPU)
    torch.dense_masked  ONE GEMM x [T, H] · w_in[E'·R, H]ᵀ → activation → per-expert bmm with the
                        routing weights folded in → sum over experts                        (tiny E)

Routing happens before: ATen ops in a decomposed program (moecc.decompose), or `moecc.ops.route_tokens`
for a moe node (select.run); dropped or unpicked slots (id -1) are skipped. `shared(y, xt, ...)`
adds a moe node's shared expert with the same GEMM forms. This module is the registry, a leaf:
choosing among the kernels and "torch.auto" (per-call dispatch by token count) live in select.py.
Kernels are inference-only: the ops' autograd recomputes the reference in backward.
`KERNELS[name] = Kernel(fn, checker(spec, tokens) -> True | reason, cost(spec, tokens) -> seconds)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from moecc import ops
from moecc.ops import activate, route_tokens, weigh
from moecc.routing import HALF, expected_load   # HALF: where the kernels follow the reference's rounding
from moecc.spec import MoESpec

from . import gemm, machine, packed, parallel, skinny
from . import grouped_mm as gmm
from .gemm import linear
from .parallel import balance, run_groups

log = logging.getLogger("moecc.backends.torch.kernels")

GATHER_MAX_PAIRS = 64          # gather re-reads an expert per (token, slot): decode only
DENSE_MAX_EXPERTS = 8          # dense_masked computes every expert on every token
DENSE_MAX_ELEMENTS = 2 ** 26   # ... and holds [T, E, R] activations
GATHER_ONCE_BYTES = 2 ** 22    # grouped_gemm: one [N, H] gather up to 4 MiB; larger buffers are fresh
                               # mmap'd pages (page faults) streamed through DRAM: gather per expert


def shared(y: Tensor, xt: Tensor, shared_w_in, shared_w_out, shared_gate, spec: MoESpec) -> Tensor:
    """y [T, H] += ops.shared_expert(xt) (a moe node's shared expert), with gemm.linear's GEMM forms
    (decode: [1, F] rows stream 1.5x faster) or, ungated with T ≤ skinny.MAX_M, one skinny.ffn_all call."""
    if skinny.fits_ffn_all(xt, shared_w_in, shared_w_out, shared_gate, spec) and y.is_contiguous():
        return skinny.ffn_all(y, xt, shared_w_in, shared_w_out, spec)
    _shared_item(xt, shared_w_in, shared_w_out, shared_gate, spec)[1](y)
    return y


def loop(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    size = float(w_in[0].numel() + w_out[0].numel())

    def expert(e: int, tok: Tensor, slot: Tensor):
        def add(y: Tensor) -> None:
            h = _expert(xt.index_select(0, tok), e, w_in, w_out, b_in, b_out, spec)   # [n, H]
            y.index_add_(0, tok, weigh(h, weights[tok, slot].unsqueeze(-1), spec, inplace=True))
        return _work(size, tok.numel()), add
    items = []
    for e in range(w_in.shape[0]):
        tok, slot = torch.where(ids == e)                                    # [n], [n]
        if tok.numel():
            items.append(expert(e, tok, slot))
    return _accumulate(xt, items)


def _work(size: float, rows: int) -> float:
    """Cost of one work item for balancing over threads: weight elements × rows (at least 8: below
    that the weights' streaming, not the rows, sets the time)."""
    return size * max(rows, 8)


def _expert(x: Tensor, e: int, w_in, w_out, b_in, b_out, spec: MoESpec, lin=linear) -> Tensor:
    """ops.ffn for expert e with gemm.linear's GEMM forms (or packed.linear's): [c, H] -> [c, H]."""
    after = spec.bias_add == "after_gemm"
    a = None
    if lin is packed.dnn_linear and not (after and b_in is not None):       # oneDNN: activation as post-op
        a = packed.dnn_linear_act(x, w_in[e], None if b_in is None else b_in[e], spec.activation)
    if a is None:
        a = activate(lin(x, w_in[e], None if b_in is None else b_in[e], after), spec)     # [c, R] -> [c, F]
    return lin(a, w_out[e], None if b_out is None else b_out[e], after)


def _shared_item(xt: Tensor, shared_w_in, shared_w_out, shared_gate, spec: MoESpec):
    """The shared expert as a work item: (cost, add-to-y)."""
    def add(y: Tensor) -> None:
        s = linear(activate(linear(xt, shared_w_in), spec), shared_w_out)      # [T, H]
        y.add_(s if shared_gate is None else s.mul_(torch.sigmoid(linear(xt, shared_gate))))
    return _work(float(shared_w_in.numel() + shared_w_out.numel()), xt.shape[0]), add


def _accumulate(xt: Tensor, items: list, split: bool = True) -> Tensor:
    """y [T, H] = Σ over work items (cost, add(y)). With several intra-op threads (and split) the items
    run split over threads, one intra-op thread each (parallel.py); partial sums are added at the end.
    split=False: in turn on the caller's thread, each item's ops on all the intra-op threads.
    Half precision (bf16/fp16) keeps the reference's order, one item after another: partial sums
    rounded per thread would differ from moe_reference in ~1/3 of the outputs."""
    def work(group) -> Tensor:
        y = torch.zeros_like(xt)                                             # [T, H]
        for i in group:
            items[i][1](y)
        return y
    threads = parallel.threads()
    if split and threads > 1 and len(items) > 1 and xt.dtype not in HALF:    # half: the reference's summation order
        parts = run_groups(work, balance([c for c, _ in items], threads))
        for p in parts[1:]:
            parts[0].add_(p)
        return parts[0]
    return work(range(len(items)))


def _fused(xt: Tensor, weights: Tensor, ids: Tensor, counts: list | None, w_in, w_out, b_in, b_out,
           spec: MoESpec) -> Tensor:
    """Every expert hit by ≤ skinny.moe_max_rows (float32): the routed experts in ONE skinny.moe C call
    per intra-op thread (a contiguous run of experts each, balanced by cost; no sort, gather, scatter
    or activation as torch ops). Decode: 1 C call."""
    E = w_in.shape[0]
    size = float(w_in[0].numel() + w_out[0].numel())
    parts = parallel.threads()
    if parts > 1 and E > 1:
        counts = counts if counts is not None else torch.bincount(ids.reshape(-1) + 1, minlength=E + 1).tolist()[1:]
        cost = [_work(size, c) if c else 0.0 for c in counts]
        bounds, acc, total = [0], 0.0, sum(cost)
        for e in range(E - 1):
            acc += cost[e]
            if len(bounds) < parts and acc >= total * len(bounds) / parts:
                bounds.append(e + 1)
        bounds.append(E)
        runs = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if sum(cost[lo:hi]) > 0]
        if len(runs) > 1:                  # one C call, its runs on the OpenMP pool (no spinning rival)
            return skinny.moe_parts(xt, ids, weights, w_in, w_out, b_in, b_out, spec,
                                    [runs[0][0]] + [hi for _, hi in runs])
        items = [(1.0, runs[0])] if runs else [(1.0, (0, E))]
    else:
        items = [(1.0, (0, E))]
    work = [(c, lambda y, r=r: skinny.moe(y, xt, ids, weights, w_in, w_out, b_in, b_out, spec, r)) for c, r in items]
    return _accumulate(xt, work)


def grouped_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec, lin=linear) -> Tensor:
    E, S = w_in.shape[0], ids.shape[1]
    fused = spec.ffn >= 8 and skinny.fits_moe(xt, w_in, w_out, b_in, b_out, spec)
    max_rows = skinny.moe_max_rows((w_in[0].numel() + w_out[0].numel()) * w_in.element_size())
    if fused and xt.shape[0] <= max_rows:                                    # no expert can exceed max_rows
        return _fused(xt, weights, ids, None, w_in, w_out, b_in, b_out, spec)
    flat = ids.reshape(-1)                                                   # [T*S]
    counts = torch.bincount(flat + 1, minlength=E + 1).tolist()             # [1 + E]; [0] = dropped
    if fused and max(counts[1:]) <= max_rows:
        return _fused(xt, weights, ids, counts[1:], w_in, w_out, b_in, b_out, spec)
    dropped, counts = counts[0], counts[1:]
    order = torch.argsort(flat, stable=True)[dropped:]                       # [N] pairs by expert
    tok = order // S                                                         # [N] token of each pair
    scale = weights.reshape(-1)[order].unsqueeze(-1)                         # [N, 1]
    once = len(order) * xt.shape[1] * xt.element_size() <= GATHER_ONCE_BYTES
    xs = xt.index_select(0, tok) if once else None                           # [N, H] if it stays cached
    size = float(w_in[0].numel() + w_out[0].numel())

    def segment(e: int, seg: slice):
        def add(y: Tensor) -> None:
            xe = xs[seg] if once else xt.index_select(0, tok[seg])           # [c, H]
            y.index_add_(0, tok[seg], weigh(_expert(xe, e, w_in, w_out, b_in, b_out, spec, lin), scale[seg],
                                            spec, inplace=True))
        return _work(size, seg.stop - seg.start), add
    items, start = [], 0
    for e, c in enumerate(counts):
        if c:
            items.append(segment(e, slice(start, start + c)))
            start += c
    # experts in turn, each GEMM on every intra-op thread: these rows are many enough for the BLAS to
    # split them, and it keeps torch's OpenMP pool busy instead of spinning beside Python workers
    # (MoEfied MiniLM at 2 threads, T = 512 / 1024: 2.3 / 4.4 ms vs 4.2 / 8.6 on parallel.py's workers)
    return _accumulate(xt, items, split=False)


def packed_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    return grouped_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec, lin=packed.linear)


def dnn_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    return grouped_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec, lin=packed.dnn_linear)


def grouped_mm(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    return gmm.grouped_mm(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec, fallback=grouped_gemm)


def gather(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    if xt.dtype in HALF:
        # a row's bf16/fp16 GEMM alone is not that row's GEMM in the expert's batch on every CPU (an
        # AVX-512 AMD EPYC: 2^-10 apart on Qwen3-MoE / OLMoE blocks), so the reference's bits need
        # the reference's batches: grouped_gemm's per-expert segments
        log.debug("torch.gather in %s: grouped_gemm (the reference's per-expert batches)", xt.dtype)
        return grouped_gemm(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec)
    size = float(w_in[0].numel() + w_out[0].numel())

    def pair(t: int, s: int, e: int, w: float):
        def add(y: Tensor) -> None:     # the decode GEMM form: w · xᵀ streams the weight once
            y[t:t + 1].add_(_expert(xt[t:t + 1], e, w_in, w_out, b_in, b_out, spec), alpha=w)   # [1, H]
        return _work(size, 1), add
    items = [pair(t, s, e, w) for t, (row, wrow) in enumerate(zip(ids.tolist(), weights.tolist()))
             for e, s, w in sorted((e, s, w) for s, (e, w) in enumerate(zip(row, wrow))) if e >= 0]
    # one sync each; a token's experts in ascending order, as the reference sums them
    return _accumulate(xt, items)


def dense_masked(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> Tensor:
    (T, H), (E, R, _) = xt.shape, w_in.shape
    dense = weights.new_zeros(T, E).scatter_add_(1, ids.clamp(min=0), weights * (ids >= 0))  # [T, E]
    after = spec.bias_add == "after_gemm"
    h = ops.linear(xt, w_in.reshape(E * R, H), None if b_in is None else b_in.reshape(E * R), spec)  # [T, E*R]
    a = activate(h.view(T, E, R), spec)                                      # [T, E, F]
    if xt.dtype in HALF:     # the reference's rounding: each expert's output weighed, summed in order
        a, w_t = a.transpose(0, 1), w_out.transpose(1, 2)
        if b_out is None or after:
            o = torch.bmm(a, w_t)                                            # [E, T, H]
            o = o if b_out is None else o.add_(b_out.unsqueeze(1))
        else:
            o = torch.baddbmm(b_out.unsqueeze(1), a, w_t)
        y = torch.zeros_like(xt)
        for e in range(E):
            y.add_(weigh(o[e], dense[:, e:e + 1], spec, inplace=True))
        return y
    a = a.mul_(dense.to(a.dtype).unsqueeze(-1)).transpose(0, 1)              # [E, T, F] weighted
    y = torch.bmm(a, w_out.transpose(1, 2)).sum(0)                           # [T, H]
    if b_out is not None:
        y = y.add_(dense.to(y.dtype) @ b_out)
    return y


# ---- checkers: True, or the reason the kernel does not fit -----------------------------------

def _always(spec: MoESpec, tokens: int | None):
    return True


def _slots(spec: MoESpec) -> int:
    return spec.num_experts if spec.router.kind == "expert_choice" else spec.top_k


def _check_gather(spec: MoESpec, tokens: int | None):
    if tokens is not None and tokens * _slots(spec) > GATHER_MAX_PAIRS:
        return (f"decode kernel: {tokens} tokens x {_slots(spec)} slots = {tokens * _slots(spec)} "
                f"expert reads > {GATHER_MAX_PAIRS}")
    return True


def _check_dense(spec: MoESpec, tokens: int | None):
    if spec.num_experts > DENSE_MAX_EXPERTS:
        return f"tiny-E kernel: E={spec.num_experts} > {DENSE_MAX_EXPERTS} (computes every expert on every token)"
    if tokens is not None and tokens * spec.num_experts * spec.in_rows > DENSE_MAX_ELEMENTS:
        return f"[T, E, R] = [{tokens}, {spec.num_experts}, {spec.in_rows}] activations too large"
    return True


# ---- costs: seconds, from the machine constants (machine.py) ---------------------------------
# Op counts per kernel were calibrated on tiny shapes (H=16), where dispatch overhead is all there is,
# in units of machine.op_time (a tiny add: typical ops of a kernel cost about twice as much).

def _expert_time(spec: MoESpec, m: float) -> float:
    """One expert on m tokens: two GEMMs + the activation's traffic."""
    H, R, Fw = spec.hidden, spec.in_rows, spec.ffn
    return (machine.gemm_time(m, H, R) + machine.gemm_time(m, Fw, H)
            + machine.elementwise_time(8 * m * (R + Fw)))


def _common_time(spec: MoESpec, tokens: int) -> float:
    """Routing and the shared expert: the same for every kernel."""
    t = machine.op_time(13)
    if spec.shared_ffn:
        t += machine.gemm_time(tokens, spec.hidden, spec.shared_in_rows) + machine.gemm_time(tokens, spec.shared_ffn, spec.hidden)
    return t


def _cost_loop(spec: MoESpec, tokens: int) -> float:
    hit, m = expected_load(spec, tokens)
    return (_common_time(spec, tokens) + machine.op_time(10 + 4 * spec.num_experts)
            + hit * (_expert_time(spec, m) + machine.op_time(18)) + machine.elementwise_time(16 * hit * m * spec.hidden))


def batched_expected(spec: MoESpec, tokens: int) -> bool:
    """Whether grouped_gemm's batched path (every expert ≤ skinny.moe_max_rows) is expected at this T
    (the busiest expert ~ mean + 3 standard deviations; float32 assumed)."""
    hit, m = expected_load(spec, tokens)
    rows = skinny.moe_max_rows(4 * (spec.in_rows * spec.hidden + spec.hidden * spec.ffn))
    return bool(machine.constants().get("skinny")) and m + 3 * m ** 0.5 <= rows


def _cost_grouped(spec: MoESpec, tokens: int) -> float:
    hit, m = expected_load(spec, tokens)
    # batched: route + 1-2 C calls (skinny.moe), measured 11-28 op_times in all at H=16 (E=8..64, T=1..8)
    fixed, per_expert = (2, 0.4) if batched_expected(spec, tokens) else (30, 16)
    return (_common_time(spec, tokens) + machine.op_time(fixed)
            + hit * (_expert_time(spec, m) + machine.op_time(per_expert))
            + machine.elementwise_time(16 * hit * m * spec.hidden))


# packed / unpacked GEMM time inside grouped_gemm, A/B at 1 thread on the bench grid's shapes (T = 64..2048,
# load ~20 on 2 shared cores): 0.99-1.05, i.e. no gain: each expert's weights stream from memory once per
# call either way, and the repacking F.linear/oneDNN save is small next to 48+ rows of FLOPs. At 1.0 the
# cost model keeps grouped_gemm (first of equal costs); an autotuned table picks packed_gemm where it wins.
PACKED_GAIN = 1.0


def _cost_packed(spec: MoESpec, tokens: int, library: str = "mkl") -> float:
    """grouped_gemm's cost with its BLAS GEMMs PACKED_GAIN × as long (oneDNN: 1 / the measured
    dnn_gain); equal where skinny.py takes them."""
    hit, m = expected_load(spec, tokens)
    base = _cost_grouped(spec, tokens)
    if not packed.available(library) or batched_expected(spec, tokens) or m <= skinny.MAX_M:
        return base
    gain = PACKED_GAIN if library == "mkl" else 1 / max(machine.constants().get("dnn_gain", 1.0), 1e-3)
    H, R, Fw = spec.hidden, spec.in_rows, spec.ffn
    return base - (1 - gain) * hit * (machine.gemm_time(m, H, R) + machine.gemm_time(m, Fw, H))


def _cost_dnn(spec: MoESpec, tokens: int) -> float:
    return _cost_packed(spec, tokens, "dnn")


# torch._grouped_mm runs MKL's sgemm for every group, where gemm.linear picks a faster form for the shape:
MKL_MIN_ROWS = 8       # MKL packs the whole weight per call: fewer rows cost about what 8 do (H=384, R=192,
                       # 1 thread: 66 µs at m = 8, 85 at 16; gemm.linear's gemv/skinny stream it at m = 1)
SKINNY_GAIN = 1.3      # skinny.py over MKL at m = 2..32 on weights of ≥ 2^20 elements (skinny.py: 1.3-2x);
                       # on smaller ones about even (MiniLM's 384 x 192 at m = 16: MKL's GEMMs alone 0.75x of
                       # skinny.gemm's, but grouped_gemm's one skinny.moe C call beat grouped_mm's ~25 ops at T=64)
DNN_GAIN = 1.3         # oneDNN over MKL for ≥ 4096 weight rows at m < 384 (gemm.py: 1.1-1.6x)


def _cost_grouped_mm(spec: MoESpec, tokens: int) -> float:
    """grouped_gemm's GEMMs (in MKL's form) without its per-expert ops: ~24 torch ops in all (sort,
    gather, two grouped GEMMs, biases, activation, combine), but every intermediate is a whole [N, ·]
    tensor (grouped_gemm's stay in cache per expert). Priced at 8H + 4R floats moved per row (the x
    gather and the combine's gather of o are 4H; the rest stands for the [N, ·] intermediates leaving
    the cache), calibrated on the MoEfied MiniLM shape (experts level, 1 thread, loaded machine): 1.15x
    faster than grouped_gemm at T=128-256, about equal at 512, 1.2x slower at T=1024."""
    hit, m = expected_load(spec, tokens)
    H, R, Fw = spec.hidden, spec.in_rows, spec.ffn
    t = _expert_time(spec, max(m, MKL_MIN_ROWS))
    if m <= skinny.MAX_M and machine.constants().get("skinny"):     # what gemm_time prices at these rows
        t *= SKINNY_GAIN if min(H * R, H * Fw) >= machine.MIN_SHAPE_ELEMENTS else 1.0
    if max(R, H) >= gemm.DNN_MIN_ROWS and m < gemm.DNN_MAX_M:
        t *= DNN_GAIN
    return (_common_time(spec, tokens) + machine.op_time(24 + 2 * _slots(spec)) + hit * t
            + machine.elementwise_time(4 * hit * m * (8 * H + 4 * R)))


def _cost_gather(spec: MoESpec, tokens: int) -> float:
    pairs = tokens * _slots(spec)
    return _common_time(spec, tokens) + pairs * (_expert_time(spec, 1) + machine.op_time(12))


def _cost_dense(spec: MoESpec, tokens: int) -> float:
    E = spec.num_experts
    return (_common_time(spec, tokens) + machine.op_time(16)
            + machine.gemm_time(tokens, spec.hidden, E * spec.in_rows)
            + E * machine.gemm_time(tokens, spec.ffn, spec.hidden)
            + machine.elementwise_time(8 * tokens * E * (spec.in_rows + spec.ffn + spec.hidden)))


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., Tensor]
    checker: Callable[[MoESpec, "int | None"], "bool | str"]
    cost: Callable[[MoESpec, int], float]
    summary: str


# kernels whose experts run on parallel.run_groups' workers: their whole op runs in a parallel.section
# (grouped_gemm's family splits on OpenMP threads instead: skinny.moe_parts, or each GEMM on all threads)
WORKERS = {"torch.loop", "torch.gather"}

KERNELS: dict[str, Kernel] = {
    "torch.loop": Kernel(loop, _always, _cost_loop, "per-expert loop (where, index_select, index_add_)"),
    "torch.grouped_gemm": Kernel(grouped_gemm, _always, _cost_grouped,
                                 "sort by expert, contiguous segments, one gather and one scatter"),
    "torch.packed_gemm": Kernel(packed_gemm, _always, _cost_packed,
                                "grouped_gemm on MKL-packed expert weights, packed once per weight tensor"),
    "torch.dnn_gemm": Kernel(dnn_gemm, _always, _cost_dnn,
                             "grouped_gemm on oneDNN-reordered expert weights, reordered once per weight tensor"),
    "torch.grouped_mm": Kernel(grouped_mm, gmm.check, _cost_grouped_mm,
                               "sort by expert, one gather, two torch._grouped_mm, an ordered combine"),
    "torch.gather": Kernel(gather, _check_gather, _cost_gather, "per (token, slot) on weight views (decode)"),
    "torch.dense_masked": Kernel(dense_masked, _check_dense, _cost_dense, "all experts on all tokens (tiny E)"),
}
