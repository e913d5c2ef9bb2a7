"""The GEMM every torch MoE kernel calls for an expert's tokens, in the form fastest for its shape.

    linear(a [m, K], w [N, K], b [N]?) -> [m, N] = a · wᵀ (+ b)

Measured on this project's CPU (AVX2; PyTorch's MKL and oneDNN; 1 thread; process time; weights
read from memory as an expert's are):
- 2 ≤ m ≤ 4: w · aᵀ (weight-stationary) is 1.3-2x faster than F.linear, which packs the weight first;
  m = 3 runs 15-35% faster padded with a zero row to m = 4 (MKL has a 4-column kernel);
- N ≥ 4096 weight rows: oneDNN (`mkldnn._linear_pointwise`) is 1.1-1.6x faster than MKL for m = 4..256
  (MKL packs the whole N x K weight, larger than the cache), and at m = 1 streams the weight at the
  bandwidth of a plain sum (10-15% ahead of MKL's gemv); from m ≈ 384 MKL is ~10% faster again;
  for N ≤ 3584 they are within 10%;
- m = 1 otherwise: w · aᵀ (MKL gemv; F.linear is up to 1.45x slower on short rows, e.g. [1024, 512]);
- otherwise MKL (F.linear).
With one intra-op thread (also each of parallel.py's expert threads) and float32, 1 ≤ m ≤ 32 rows go
to skinny.py's weight-streaming kernel instead (no weight packing): 1.3-2x faster than every BLAS
form above for m = 2..32, the weight streamed at bandwidth for m ≤ 3; at m = 1 as fast as oneDNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import skinny

_DNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
DNN_MIN_ROWS = 4096
DNN_MAX_M = 384
SMALL_M = 4


def form(a: Tensor, w: Tensor) -> str:
    """"skinny", "dnn", "small" (w · aᵀ) or "mkl" for this [m, K] · [N, K]ᵀ."""
    dnn = (_DNN is not None and w.shape[0] >= DNN_MIN_ROWS and a.dtype == torch.float32
           and w.dtype == torch.float32)
    m = a.shape[0]
    if torch.get_num_threads() == 1 and skinny.fits(a, w):
        return "skinny"
    if m == 1:
        return "dnn" if dnn else "small"
    if m <= SMALL_M:
        return "small"
    return "dnn" if dnn and m < DNN_MAX_M else "mkl"


def linear(a: Tensor, w: Tensor, b: Tensor | None = None, bias_after: bool = False) -> Tensor:
    """bias_after: b added to the GEMM's result (rounded to a's dtype first; MoESpec.bias_add)."""
    if bias_after and b is not None:
        return linear(a, w).add_(b)
    f = form(a, w)
    if f == "skinny":
        r = skinny.gemm(a, w)
        return r if b is None else r.add_(b)
    if f == "dnn":
        return _DNN(a, w, b, "none", [], "")
    if f == "mkl":
        return F.linear(a, w, b)
    if a.shape[0] == 3:                                                      # pad to MKL's 4 columns
        r = torch.mm(w, torch.cat([a, a.new_zeros(1, a.shape[1])]).t())[:, :3].t()
    else:
        r = torch.mm(w, a.t()).t()                                           # [m, N]
    return r if b is None else r + b
