"""Constants of the cost model, measured at start-up on the ranks themselves (all ranks at once, so
they compete for the machine as the layers will):

    measure(spec, w_in, w_out, placement, group, tokens, rows=...) -> Measured
        alpha, beta      of the group's all-to-all (through moecc.distributed.comm: the installed
                         transport if any): per call of a burst of empty exchanges issued back to back
                         (as the chunked schedule issues its dispatches), then of exchanges of `rows`
                         hidden rows with every peer
        lone             per call of empty exchanges each waited for at once (as the split sizes, and
                         every collective of the unchunked schedule): a lone exchange's own latency
                         (waking the threads that run it and the one that waits) beyond a burst's
        busy             per call of a burst of empty exchanges issued while every rank computes: the
                         real exchange's pace when its threads compete with compute for the cores
        steal, steal_fixed  what an exchange issued while the rank computes takes from that compute,
                         per byte and per call: GEMMs timed with a burst of exchanges (empty, then of
                         a layer's rows, >= 1 MiB) issued at their start, less the same GEMMs alone.
                         Here the real exchange's threads share the cores (4 ranks on 2: 0.5-2 ms
                         per call, ~1.5 ms per MB; samples/results/overlap_notes.md, session 17)
        flops, chunk     the local experts (torch.ops.moecc.experts) timed at two row counts: GEMM
                         throughput from the slope, the fixed cost per call from the intercept
        plan, plan_fixed the send layout (layout.layout) and the packed dispatch buffer
                         (ep.dispatch_buffer), per token and per call
        pack, pack_fixed the packed dispatch buffer alone (part of plan: the chunked schedule packs
                         while the split sizes are in flight)
        sums, sums_fixed the combine's weigh-and-sum per token and per call
        unpack, unpack_fixed  reading a received dispatch (Dispatched.wait: unpack the rows and
                         pairs, index them for autograd), per token and per call
        bwd_flops, bwd_chunk  the local experts' backward (input, routing-weight and weight
                         gradients: one autograd.grad) at two row counts, as FLOP/s of the forward's
                         FLOP count (≈ half the forward's when the backward costs twice) and per call
        grads, grads_fixed  the token sums of returned gradients (ep.token_grad, ep.weight_grad),
                         per token and per call
        cold_exp, cold_sums, cold_plan, cold_pack (and _fixed)  what one call of the dispatch reading
                         + experts, the sums, the layout + packing, the packing costs beyond its burst
                         timing when it runs right after a wait that blocked (an empty exchange waited
                         for at once): per token and per call, >= 0. Caches and clocks after an idle
                         wait: on this 2-core VM the first call after a 4 ms wait ran up to 2x its
                         burst time (samples/results/overlap_notes.md, session 15)
    The compute is timed on every rank in the same instants (together(): an agreed start on the
    machine's monotonic clock), in bursts of calls long enough to overlap: where ranks share cores
    (4 gloo ranks on 2 cores) each call is timed as stretched as the layer's will be. The slowest
    rank's value of each is kept (one all_gather): the bottleneck rank sets the step.

The fastest of a few repeats (least disturbed by other jobs); never used in tests as assertions (benchmarks only).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moecc.distributed import comm
from moecc.distributed.ep import (Dispatched, Received, Sizes, _sum_slots, dispatch_buffer, local_experts,
                                  token_grad, weight_grad)
from moecc.distributed.ep_costs import COLD
from moecc.distributed.layout import layout

BURST_S = 4e-3          # a timed burst of compute calls lasts at least this long (s)


@dataclass(frozen=True)
class Measured:
    alpha: float
    beta: float                 # s per byte
    flops: float                # FLOP/s of the local experts' GEMMs
    chunk: float                # s per experts call
    plan: float                 # s per token (layout)
    plan_fixed: float
    sums: float                 # s per token (combine sum)
    sums_fixed: float
    lone: float = 0.0           # s per exchange waited for at once (>= alpha when measured)
    unpack: float = 0.0         # s per token (reading a received dispatch)
    unpack_fixed: float = 0.0   # s per call
    pack: float = 0.0           # s per token (the packed dispatch buffer alone: part of plan)
    pack_fixed: float = 0.0
    busy: float = 0.0           # s per exchange of a burst issued while every rank computes
    bwd_flops: float = 0.0      # forward FLOPs per s of the local experts' backward (0: not measured)
    bwd_chunk: float = 0.0      # s per experts backward call
    grads: float = 0.0          # s per token (token sums of the returned gradients)
    grads_fixed: float = 0.0
    cold_exp: float = 0.0       # s per token beyond the burst's, right after a wait that blocked
    cold_exp_fixed: float = 0.0
    cold_sums: float = 0.0
    cold_sums_fixed: float = 0.0
    cold_plan: float = 0.0
    cold_plan_fixed: float = 0.0
    cold_pack: float = 0.0
    cold_pack_fixed: float = 0.0
    steal: float = 0.0          # s of compute per byte of an exchange issued while computing
    steal_fixed: float = 0.0    # ... per call

    def to_dict(self) -> dict:
        return asdict(self)


def together(group) -> None:
    """Return on every rank of `group` at about the same instant: the ranks agree on a start time
    on time.perf_counter (CLOCK_MONOTONIC: one clock for every process of a machine) later than any
    of them can leave the agreeing collectives, and sleep until it. Ranks on different machines
    (clocks that disagree by more than a second) only get the collectives' barrier."""
    t0 = time.perf_counter()
    clocks = comm.agree(torch.tensor([t0], dtype=torch.float64), group, "probe: clocks")
    took = comm.agree(torch.tensor([time.perf_counter() - t0], dtype=torch.float64), group, "probe: clocks")
    start = clocks.max().item() + 2.0 * took.max().item() + 1e-3
    left = start - time.perf_counter()
    if not 0 < left < 1.0:
        return
    if left > 2e-4:
        time.sleep(left - 2e-4)
    while time.perf_counter() < start:            # the last 0.2 ms: a sleep's wake-up is coarser
        pass


def _line(x1, t1, x2, t2) -> tuple[float, float]:
    """(slope, intercept >= 0) through two timings."""
    slope = max((t2 - t1) / (x2 - x1), 1e-15)
    return slope, max(t1 - slope * x1, 0.0)


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rounds(fns: list, group, repeats: int, aligned: bool = True) -> list[float]:
    """Per call of each fn: every round starts on all ranks together and times each fn in a burst
    of calls (as many as the fastest rank needs to fill BURST_S, agreed: every rank runs as many);
    the fastest round of each. aligned=False: one call per timing, no common start (the probe
    before 2026-12-03, kept to compare: it times mostly uncontended calls)."""
    if not aligned:
        return [min(_once(fn) for _ in range(repeats)) for fn in fns]
    once = [_once(fn) for fn in fns]
    mine = torch.tensor([max(1, math.ceil(BURST_S / max(t, 1e-7))) for t in once], dtype=torch.float64)
    calls = [int(n) for n in comm.agree(mine, group, "probe: burst sizes").max(0).values.tolist()]
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        together(group)
        for i, (fn, n) in enumerate(zip(fns, calls)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return best


def _cold(fns: list, group, repeats: int) -> list[float]:
    """Per fn: one call right after an empty exchange waited for at once (all ranks together: every
    compute step of the unchunked schedule follows a wait that blocked); the fastest repeat."""
    import torch.distributed as dist

    W = dist.get_world_size(group)
    empty = torch.zeros(0, 1)
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            together(group)
            comm.all_to_all(empty, [0] * W, [0] * W, group, "probe: cold").wait()
            best[i] = min(best[i], _once(fn))
    return best


def _penalty(x1, p1, x2, p2) -> tuple[float, float]:
    """(per unit >= 0, fixed >= 0) of an extra time measured at two sizes (noisy: a negative
    extra counts 0; a smaller extra at the larger size: the larger size's, as a fixed cost)."""
    p1, p2 = max(p1, 0.0), max(p2, 0.0)
    slope = max((p2 - p1) / (x2 - x1), 0.0)
    return slope, max(p2 - slope * x2, 0.0)


def measure_comm(group, hidden: int, dtype, rows: int = 256, repeats: int = 5, burst: int = 6,
                 aligned: bool = True) -> tuple[float, float, float]:
    """(alpha s, beta s/byte, lone s) of this rank's all-to-all through moecc.distributed.comm: alpha,
    beta per call of a burst issued back to back (async), as the chunked schedule issues them; lone
    per call of exchanges each waited for at once."""
    import torch.distributed as dist

    W = dist.get_world_size(group)

    def timed(t, n, lone):
        best = math.inf
        for _ in range(repeats):
            if aligned:
                together(group)
            t0 = time.perf_counter()
            if lone:
                for _ in range(burst):
                    comm.all_to_all(t, [n] * W, [n] * W, group, "probe").wait()
            else:
                for p in [comm.all_to_all(t, [n] * W, [n] * W, group, "probe", async_op=True)
                          for _ in range(burst)]:
                    p.wait()
            best = min(best, (time.perf_counter() - t0) / burst)
        return best
    empty = torch.zeros(0, hidden, dtype=dtype)
    t_a = timed(empty, 0, False)
    big = torch.zeros(rows * W, hidden, dtype=dtype)
    t_b = timed(big, rows, False)
    beta, alpha = _line(0, t_a, rows * (W - 1) * hidden * big.element_size(), t_b)
    return alpha, beta, (max(timed(empty, 0, True), alpha) if aligned else 0.0)


def measure_busy(group, hidden: int, w_in, rows: int, repeats: int = 5, burst: int = 6) -> float:
    """Per call of a burst of empty exchanges issued back to back while every rank computes (GEMMs
    of `rows` rows through the first local expert's input weights, until the burst is delivered):
    the exchanges' real threads then compete with the compute for the cores, as in the chunked
    schedule; granularity: one GEMM."""
    import torch.distributed as dist

    W = dist.get_world_size(group)
    x = torch.randn(rows, hidden, dtype=w_in.dtype, device=w_in.device)
    empty = torch.zeros(0, hidden, dtype=w_in.dtype)
    best = math.inf
    for _ in range(repeats):
        together(group)
        t0 = time.perf_counter()
        pend = [comm.all_to_all(empty, [0] * W, [0] * W, group, "probe", async_op=True) for _ in range(burst)]
        while not pend[-1].done():
            x @ w_in[0].T                                                     # [rows, R]
        best = min(best, (time.perf_counter() - t0) / burst)
        for p in pend:
            p.wait()
    return best


STEAL_SPAN_S = 0.06     # the GEMMs timed beside a burst of exchanges last about this long (s)
STEAL_BYTES = 1 << 20   # the per-byte part is timed on exchanges of at least this many bytes a call


def measure_steal(group, hidden: int, w_in, rows: int, repeats: int = 5, burst: int = 6) -> tuple[float, float]:
    """(s per byte, s per call) of compute an exchange takes when issued while the rank computes:
    per round (all ranks together) GEMMs of the first local expert's input weights timed with
    `burst` exchanges issued at their start (async, as the chunked schedule issues them), and the
    same GEMMs alone; the fastest of each, empty and with the layer's `rows` per rank spread over
    the peers (at least STEAL_BYTES a call: at a small layer's sizes the per-byte part drowns in the
    per-call noise)."""
    import torch.distributed as dist

    W = dist.get_world_size(group)
    per_peer = max(rows // W, 8)
    x = torch.randn(max(per_peer // 2, 8), hidden, dtype=w_in.dtype)
    one = min(_once(lambda: x @ w_in[0].T) for _ in range(3))
    n = int(comm.agree(torch.tensor([math.ceil(STEAL_SPAN_S / max(one, 1e-7))], dtype=torch.float64),
                       group, "probe: steal calls").max())

    def gemms():
        for _ in range(n):
            x @ w_in[0].T

    def stolen(per_peer: int) -> float:
        t = torch.zeros(per_peer * W, hidden, dtype=w_in.dtype)
        beside, alone = math.inf, math.inf
        for _ in range(repeats):
            together(group)
            t0 = time.perf_counter()
            pend = [comm.all_to_all(t, [per_peer] * W, [per_peer] * W, group, "probe: steal", async_op=True)
                    for _ in range(burst)]
            gemms()
            beside = min(beside, time.perf_counter() - t0)
            for p in pend:
                p.wait()
            together(group)
            alone = min(alone, _once(gemms))
        return (beside - alone) / burst
    if W == 1:                                   # nothing crosses: the call's own cost only
        return 0.0, max(stolen(0), 0.0)
    row = (W - 1) * hidden * w_in.element_size()
    per_peer = max(per_peer, math.ceil(STEAL_BYTES / row))
    return _penalty(0, stolen(0), per_peer * row, stolen(per_peer))


def measure_compute(spec, w_in, w_out, placement, group, tokens: int, repeats: int = 5,
                    seed: int = 0, aligned: bool = True) -> list[float]:
    """[1/flops, chunk, plan, plan_fixed, sums, sums_fixed, unpack, unpack_fixed, pack, pack_fixed,
    1/bwd_flops, bwd_chunk, grads, grads_fixed, cold_exp, cold_exp_fixed, cold_sums, cold_sums_fixed,
    cold_plan, cold_plan_fixed, cold_pack, cold_pack_fixed] of this rank (module docstring), timed
    while every rank computes (cold: aligned only, else 0)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    H, k, E = spec.hidden, spec.top_k, spec.num_experts
    dtype, E_r, js = w_in.dtype, w_in.shape[0], spec.to_json()
    g = torch.Generator().manual_seed(seed + rank)

    def experts(n):
        r = Received(torch.randn(n, H, generator=g, dtype=dtype), torch.ones(n, 1, dtype=dtype),
                     (torch.arange(n) % E_r).unsqueeze(1))
        return lambda: local_experts(r, w_in, w_out, None, None, js)

    def backward(n):                             # one autograd.grad through a kept graph
        with torch.enable_grad():
            r = Received(torch.randn(n, H, generator=g, dtype=dtype, requires_grad=True),
                         torch.ones(n, 1, dtype=dtype, requires_grad=True), (torch.arange(n) % E_r).unsqueeze(1))
            leaves = [w.detach().requires_grad_() for w in (w_in, w_out)]
            y = local_experts(r, *leaves, None, None, js)
        inputs, gy = [r.x, r.weights, *leaves], torch.randn(y.shape, generator=g, dtype=dtype)

        def run():
            with torch.enable_grad():
                torch.autograd.grad(y, inputs, gy, retain_graph=True)
        return run
    n1, n2 = max(tokens * k // 8, E_r), max(tokens * k, E_r + 1)
    rng = np.random.default_rng(seed)

    def steps(n):
        """(plan, sum, read, pack) on n tokens routed at random."""
        ids = torch.as_tensor(np.argsort(rng.random((n, E)), 1)[:, :k])
        lay = layout(ids, placement, rank, np.arange(n))
        back = torch.randn(int(lay.token.numel()), H, dtype=dtype)
        x, w = torch.randn(n, H, dtype=dtype), torch.rand(n, k, dtype=dtype)

        def plan():                                   # the send layout, then the packed dispatch
            dispatch_buffer(x, w, layout(ids, placement, rank, np.arange(n)))
        return (plan, (lambda: _sum_slots(back, ids, lay)), _reader(x, w, ids, lay, group),
                lambda: dispatch_buffer(x, w, lay),
                lambda: (token_grad(back, lay, ids), weight_grad(back[:, :1], lay, ids.shape)))
    m1, m2 = max(tokens // 8, 1), max(tokens, 2)
    a, b = steps(m1), steps(m2)
    fns = [experts(n1), experts(n2), a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3],
           backward(n1), backward(n2), a[4], b[4]]
    t = _rounds(fns, group, repeats, aligned)
    flop = 2.0 * H * (w_in.shape[1] + w_out.shape[2])                  # forward FLOPs per row
    per_row, chunk = _line(n1, t[0], n2, t[1])
    bwd_row, bwd_chunk = _line(n1, t[10], n2, t[11])
    cold = [0.0] * 8
    if aligned:     # (read + experts, sums, layout + packing, packing) at m1 and m2 tokens
        cold_fns = [lambda: (fns[6](), fns[0]()), lambda: (fns[7](), fns[1]()), *fns[2:6], fns[8], fns[9]]
        c = _cold(cold_fns, group, repeats)
        warm = [t[6] + t[0], t[7] + t[1], *t[2:6], t[8], t[9]]
        cold = [v for i in (0, 4, 2, 6) for v in _penalty(m1, c[i] - warm[i], m2, c[i + 1] - warm[i + 1])]
    return [per_row / flop, chunk, *_line(m1, t[2], m2, t[3]), *_line(m1, t[4], m2, t[5]), *_line(m1, t[6], m2, t[7]),
            *_line(m1, t[8], m2, t[9]), bwd_row / flop, bwd_chunk, *_line(m1, t[12], m2, t[13]), *cold]


def _reader(x, w, ids, lay, group):
    """Dispatched.wait() (unpack the rows and pairs, index them for autograd) on a buffer laid out
    as received: this rank's own packed dispatch, its piece for rank j read as if rank j sent it."""
    buf, _ = dispatch_buffer(x, w, lay)
    sizes = Sizes(list(lay.send), list(lay.send), list(lay.row_send), list(lay.row_send), None, None)
    pending = comm.Pending(buf, None, group, "probe")
    return lambda: Dispatched(x, w, ids, lay, sizes, group, "probe", pending).wait()


def measure(spec, w_in, w_out, placement, group, tokens: int, repeats: int = 5,
            aligned: bool = True) -> Measured:
    """Both parts on every rank; the slowest rank's value of each (one all_gather). aligned=False:
    the probe before 2026-12-03 (compute timed one call at a time with no common start, no lone
    exchange, no dispatch reading), kept to compare the two in one run (samples/overlap_bench.py)."""
    alpha, beta, lone = measure_comm(group, spec.hidden, w_in.dtype, repeats=repeats, aligned=aligned)
    c = measure_compute(spec, w_in, w_out, placement, group, tokens, repeats, aligned=aligned)
    busy = measure_busy(group, spec.hidden, w_in, max(tokens * spec.top_k // 8, 8), repeats) if aligned else 0.0
    steal = measure_steal(group, spec.hidden, w_in, tokens * spec.top_k, repeats) if aligned else (0.0, 0.0)
    if not aligned:
        lone, c[6:10] = 0.0, [0.0, 0.0, 0.0, 0.0]
    mine = torch.tensor([alpha, beta, *c[:6], lone, *c[6:10], busy, *c[10:], *steal], dtype=torch.float64)
    worst = comm.agree(mine, group, "probe constants").max(0).values.tolist()   # the slowest rank
    w = dict(zip(("alpha", "beta", "flops", "chunk", "plan", "plan_fixed", "sums", "sums_fixed", "lone",
                  "unpack", "unpack_fixed", "pack", "pack_fixed", "busy", "bwd_flops", "bwd_chunk", "grads",
                  "grads_fixed", *COLD, "steal", "steal_fixed"), worst))
    return Measured(**{**w, "flops": 1.0 / w["flops"], "bwd_flops": 1.0 / w["bwd_flops"]})

