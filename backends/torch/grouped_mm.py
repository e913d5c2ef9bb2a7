"""torch.grouped_mm: a layer's experts as TWO grouped GEMM ops over rows sorted by expert, an ordered combine.

    (token, slot) pairs, stably by expert (dropped first)  ⇒  kept [N], offs [E'] (end of each expert's rows)
    xs [N, H] = x[token of each kept pair]                                      (one index_select)
    h  [N, R] = torch._grouped_mm(xs, w_inᵀ, offs) (+ b_in of each row's expert) → activation
    o  [N, H] = torch._grouped_mm(a, w_outᵀ, offs) (· weight, skipped when every weight is 1)
    y  [T, H] = Σ_slots o[row of (t, slot)], a token's slots in ascending expert order (gather + adds)
              + [T, E'] routing weights · b_out                         (b_out once per token, not per row)

Why (issue 17, a MoEfied MiniLM FFN, E=8 of 192 neurons, k=2, 1 thread): beyond skinny.py's rows
(≤ 32 per expert: one C call) grouped_gemm runs 6-8 torch ops per expert in Python (gather, two GEMMs,
activation, scale, index_add_: a scatter_add_ on CPU); here the op count does not grow with E', both
GEMMs are one ATen op each (its CPU path loops over the groups in C++ with MKL sgemm, no padding), and
nothing is scattered: faster from T ≈ 128 to 512 on that layer; beyond, grouped_gemm's per-expert
intermediates staying in cache win (the cost model prices both, kernels.py). Measured against padding every expert to the
busiest one's rows for two torch.bmm (samples/results/moefy_ffn_profile.md): the padding cost more than
the batching saved at every T (random routing: the busiest of 8 experts has ~1.2-1.5x the mean load).

Numerics as experts_reference: each expert's output weighed by `weigh` (spec.combine) and summed in
ascending expert order, token (slot) order within an expert; the sum starts from the first product
instead of 0 + it (the same value; -0.0 becomes +0.0). The GEMMs are MKL's sgemm as F.linear's, b_in
added to the product (not inside the GEMM), b_out's weighed sum added to the tokens' sums (not per
pair before weighing): float32 rounding of the reference's order. torch._grouped_mm takes
float32 (and half) rows of 16-byte strides: H, R, F multiples of 4 (the checker says so); other
dtypes (float64; half types, whose bits the reference's per-expert F.linear keeps) and non-contiguous
weights run `fallback` (kernels.grouped_gemm), logged at debug.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from moecc.ops import activate, weigh
from moecc.spec import MoESpec

log = logging.getLogger("moecc.backends.torch.grouped_mm")


def available() -> bool:
    return hasattr(torch, "_grouped_mm")


def check(spec: MoESpec, tokens: int | None):
    """True, or why torch._grouped_mm cannot take this layer (row strides of 16 bytes in float32)."""
    if not available():
        return f"torch {torch.__version__} has no torch._grouped_mm"
    odd = {n: v for n, v in (("H", spec.hidden), ("R", spec.in_rows), ("F", spec.ffn)) if v % 4}
    if odd:
        return f"torch._grouped_mm needs rows of 16 bytes: {', '.join(f'{n}={v}' for n, v in odd.items())} not a multiple of 4"
    return True


def fits(xt: Tensor, w_in: Tensor, w_out: Tensor, b_in, b_out, spec: MoESpec) -> bool:
    """Whether this call can run here: float32 CPU tensors, contiguous weights, the checker's shapes."""
    return (check(spec, None) is True and xt.shape[1] % 4 == 0
            and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (xt, w_in, w_out, b_in, b_out))
            and w_in.is_contiguous() and w_out.is_contiguous())


def layout(ids: Tensor, weights: Tensor, experts: int):
    """The kept pairs sorted by expert, or None when none is routed.

    -> (kept [N] (pair index t·S + s, by expert then pair), offs [E'] int32 (end row of each expert),
        pos [T, S] (row of each (t, s); N for an empty slot; ascending along S: a token's experts in
        order), w [N] (weight of each row) or None when every one is exactly 1, empty slots (count))"""
    T, S = ids.shape
    flat = ids.reshape(-1)                                                   # [n]
    c = torch.bincount(flat + 1, minlength=experts + 1)                      # [1 + E']; [0] = empty slots
    dropped = int(c[0])
    N = flat.numel() - dropped
    if N == 0:
        return None
    kept = torch.argsort(flat, stable=True)[dropped:]                        # [N]
    offs = c[1:].cumsum(0).to(torch.int32)                                   # [E']
    pos = torch.full((T * S,), N, dtype=torch.long).index_copy_(0, kept, torch.arange(N)).view(T, S)
    if S > 1:
        pos = pos.sort(dim=1).values
    w = weights.reshape(-1).index_select(0, kept)                            # [N]
    return kept, offs, pos, None if bool((w == 1).all()) else w, dropped


@torch.no_grad()         # inference-only, as every kernel (the op's backward recomputes the reference)
def grouped_mm(xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec, fallback=None) -> Tensor:
    """experts_reference's y [T, H] (module doc); `fallback` (kernels.grouped_gemm) runs what does not fit."""
    (T, H), S = xt.shape, ids.shape[1]
    if not fits(xt, w_in, w_out, b_in, b_out, spec):
        log.debug("grouped_mm: %s %s weights (contiguous: %s): grouped_gemm instead", xt.dtype, tuple(w_in.shape),
                  w_in.is_contiguous() and w_out.is_contiguous())
        return fallback(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec)
    lay = layout(ids, weights, w_in.shape[0])
    if lay is None:
        return torch.zeros_like(xt)
    kept, offs, pos, w, dropped = lay
    N = kept.numel()
    E = w_in.shape[0]
    h = torch._grouped_mm(xt.index_select(0, kept // S), w_in.transpose(1, 2), offs)        # [N, R]
    if b_in is not None:
        _add_rows(h, b_in, ids, kept, offs)
    o = torch._grouped_mm(activate(h, spec), w_out.transpose(1, 2), offs)                   # [N, H]
    if w is not None:
        weigh(o, w.unsqueeze(-1), spec, inplace=True)
    if dropped:                                                              # empty slots: row 0, then zeroed
        empty = pos == N                                                     # [T, S]
        pos = pos.masked_fill(empty, 0)
    g = o.index_select(0, pos.reshape(-1)).view(T, S, H)                     # [T, S, H]
    if dropped:
        g.masked_fill_(empty.unsqueeze(-1), 0.0)
    y = g[:, 0] if S == 1 else torch.add(g[:, 0], g[:, 1])                   # [T, H]
    for s in range(2, S):
        y.add_(g[:, s])
    if b_out is not None:        # Σ_slots weight · b_out[expert] in one [T, E'] · [E', H] GEMM (column 0: empty)
        per = weights.new_zeros(T, E + 1).scatter_add_(1, ids + 1, weights)[:, 1:]       # [T, E']
        y.addmm_(per.to(y.dtype), b_out)
    return y


BIAS_ROWS = 32           # experts with at least this many rows on average: b_in added per expert's rows


def _add_rows(h: Tensor, b: Tensor, ids: Tensor, kept: Tensor, offs: Tensor) -> None:
    """h [N, R] += b [E', R] of each row's expert: per expert's rows (E' broadcast adds) when they are
    many, else one gather of the bias rows."""
    E = b.shape[0]
    if h.shape[0] >= BIAS_ROWS * E:
        lo = 0
        for e, hi in enumerate(offs.tolist()):
            if hi > lo:
                h[lo:hi].add_(b[e])
            lo = hi
    else:
        h.add_(b.index_select(0, ids.reshape(-1).index_select(0, kept)))


__all__ = ["grouped_mm", "layout", "check", "fits", "available"]
