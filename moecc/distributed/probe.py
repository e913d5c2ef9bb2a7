"""Constants of the cost model, measured at start-up on the ranks themselves (all ranks at once, so
they compete for the machine as the layers will):

    measure(spec, w_in, w_out, placement, group, tokens, rows=...) -> Measured
        alpha, beta      of the group's all-to-all (through moecc.distributed.comm: the installed
                         transport if any): per call of a burst of empty exchanges, then of
                         exchanges of `rows` hidden rows with every peer
        flops, chunk     the local experts (torch.ops.moecc.experts) timed at two row counts: GEMM
                         throughput from the slope, the fixed cost per call from the intercept
        plan, plan_fixed the send layout (layout.layout) and the packed dispatch buffer
                         (ep.dispatch_buffer), per token and per call
        sums, sums_fixed the combine's weigh-and-sum per token and per call
    The slowest rank's value of each is kept (one all_gather): the bottleneck rank sets the step.

The fastest of a few repeats (least disturbed by other jobs); never used in tests as assertions (benchmarks only).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moecc.distributed import comm
from moecc.distributed.ep import Received, _sum_slots, dispatch_buffer, local_experts
from moecc.distributed.layout import layout


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

    def to_dict(self) -> dict:
        return asdict(self)


def _fastest(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _line(x1, t1, x2, t2) -> tuple[float, float]:
    """(slope, intercept >= 0) through two timings."""
    slope = max((t2 - t1) / (x2 - x1), 1e-15)
    return slope, max(t1 - slope * x1, 0.0)


def measure_comm(group, hidden: int, dtype, rows: int = 256, repeats: int = 5, burst: int = 6
                 ) -> tuple[float, float]:
    """(alpha s, beta s/byte) of this rank's all-to-all through moecc.distributed.comm, per call of
    a burst issued back to back (async), as the chunked schedule issues them."""
    import torch.distributed as dist

    W = dist.get_world_size(group)

    def per_call(t, n):
        def run():
            for p in [comm.all_to_all(t, [n] * W, [n] * W, group, "probe", async_op=True)
                      for _ in range(burst)]:
                p.wait()
        return _fastest(run, repeats) / burst
    t_a = per_call(torch.zeros(0, hidden, dtype=dtype), 0)
    big = torch.zeros(rows * W, hidden, dtype=dtype)
    t_b = per_call(big, rows)
    beta, alpha = _line(0, t_a, rows * (W - 1) * hidden * big.element_size(), t_b)
    return alpha, beta


def measure_compute(spec, w_in, w_out, placement, rank: int, tokens: int, repeats: int = 5,
                    seed: int = 0) -> list[float]:
    """[1/flops, chunk, plan, plan_fixed, sums, sums_fixed] of this rank (module docstring)."""
    H, k, E = spec.hidden, spec.top_k, spec.num_experts
    dtype, E_r, js = w_in.dtype, w_in.shape[0], spec.to_json()
    g = torch.Generator().manual_seed(seed + rank)

    def experts(n):
        r = Received(torch.randn(n, H, generator=g, dtype=dtype), torch.ones(n, 1, dtype=dtype),
                     (torch.arange(n) % E_r).unsqueeze(1))
        return lambda: local_experts(r, w_in, w_out, None, None, js)
    n1, n2 = max(tokens * k // 8, E_r), max(tokens * k, E_r + 1)
    per_row, chunk = _line(n1, _fastest(experts(n1), repeats), n2, _fastest(experts(n2), repeats))
    rng = np.random.default_rng(seed)

    def lay_and_sum(n):
        ids = torch.as_tensor(np.argsort(rng.random((n, E)), 1)[:, :k])
        lay = layout(ids, placement, rank, np.arange(n))
        back = torch.randn(int(lay.token.numel()), H, dtype=dtype)
        x, w = torch.randn(n, H, dtype=dtype), torch.rand(n, k, dtype=dtype)

        def plan():                                   # the send layout, then the packed dispatch
            dispatch_buffer(x, w, layout(ids, placement, rank, np.arange(n)))
        return plan, (lambda: _sum_slots(back, ids, lay))
    m1, m2 = max(tokens // 8, 1), max(tokens, 2)
    (l1, s1), (l2, s2) = lay_and_sum(m1), lay_and_sum(m2)
    plan = _line(m1, _fastest(l1, repeats), m2, _fastest(l2, repeats))
    sums = _line(m1, _fastest(s1, repeats), m2, _fastest(s2, repeats))
    inv_flops = per_row / (2.0 * H * (w_in.shape[1] + w_out.shape[2]))
    return [inv_flops, chunk, plan[0], plan[1], sums[0], sums[1]]


def measure(spec, w_in, w_out, placement, group, tokens: int, repeats: int = 5) -> Measured:
    """Both parts on every rank; the slowest rank's value of each (one all_gather)."""
    import torch.distributed as dist

    alpha, beta = measure_comm(group, spec.hidden, w_in.dtype, repeats=repeats)
    mine = torch.tensor([alpha, beta, *measure_compute(spec, w_in, w_out, placement,
                                                       dist.get_rank(group), tokens, repeats)],
                        dtype=torch.float64)
    worst = comm.agree(mine, group, "probe constants").max(0).values.tolist()   # the slowest rank
    return Measured(worst[0], worst[1], 1.0 / worst[2], *worst[3:])
