"""The GEMM every torch MoE kernel calls for an expert's tokens, in the form fastest for its shape.

    linear_into(a [m, K], w [N, K], b [N]?, out [m, N]) -> out = a · wᵀ (+ b)
    linear(a [m, K], w [N, K], b [N]?) -> [m, N]          (a new tensor; the decode kernel's form)

Measured on this project's CPU (AVX2; PyTorch's MKL and oneDNN; 1 thread; process time):
- m ≤ 4: w · aᵀ (weight-stationary) is 1.3-2x faster than F.linear, which packs the weight first
  (even at m = 1 for short rows: [1024, 512] weights stream at 1.45x the time with F.linear);
  m = 3 runs 15-35% faster padded with a zero row to m = 4 (MKL has a 4-column kernel);
- N ≥ 4096 weight rows: oneDNN (`mkldnn._linear_pointwise`) is 1.4-2x faster than MKL for m = 4..256
  (MKL packs the whole N x K weight, larger than the cache); for N ≤ 3584 the two are within 10%;
- otherwise MKL's addmm, written straight into `out` (no copy).
"""
from __future__ import annotations

import torch
from torch import Tensor

_DNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
DNN_MIN_ROWS = 4096
SMALL_M = 4


def _small(a: Tensor, w: Tensor) -> Tensor:
    """[m ≤ 4, K] · wᵀ as w · aᵀ (m = 3 padded to 4)."""
    if a.shape[0] == 3:
        return torch.mm(w, torch.cat([a, a.new_zeros(1, a.shape[1])]).t())[:, :3].t()
    return torch.mm(w, a.t()).t()                                            # [m, N]


def linear_into(a: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    m = a.shape[0]
    if m <= SMALL_M:
        r = _small(a, w)
        return out.copy_(r) if b is None else torch.add(r, b, out=out)
    if (_DNN is not None and w.shape[0] >= DNN_MIN_ROWS and a.dtype == torch.float32
            and w.dtype == torch.float32):
        return out.copy_(_DNN(a, w, b, "none", [], ""))
    return torch.mm(a, w.t(), out=out) if b is None else torch.addmm(b, a, w.t(), out=out)


def linear(a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    if a.shape[0] <= SMALL_M:
        r = _small(a, w)
        return r if b is None else r + b
    return linear_into(a, w, b, a.new_empty(a.shape[0], w.shape[0]))
