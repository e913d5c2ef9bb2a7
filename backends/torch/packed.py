"""Packed expert weights: each weight packed ONCE (per loaded program), reused by every call.

    linear(a [m, K], w [N, K], b [N]?) -> [m, N] = a · wᵀ (+ b), MKL's packed sgemm: F.linear's bits
    dnn_linear(a, w, b?)          the same on oneDNN's reordered weight (`mkldnn._reorder_linear_weight`
                                  + `mkldnn._linear_pointwise`): not F.linear's bits (another summation
                                  order), 2-3.6x F.linear's GFLOP/s on an AVX-512 AMD EPYC at 2 threads
                                  (m = 64..2048, [7168, 1024]: 410-504 vs 123-198), where MKL keeps to
                                  its AVX2 path; machine.py measures the gain on each machine
    pack(w, library="mkl") -> packed | None      the cached pack (None: w cannot be packed, see below)

`torch.ops.mkl._mkl_reorder_linear_weight(w, batch)` reorders w into MKL's packed GEMM layout;
`torch.ops.mkl._mkl_linear(a, packed, w, b, batch)` multiplies with it. Checked on torch 2.13 CPU:
bit-identical to F.linear for every m whatever `batch` was (batch is a hint for MKL's kernel choice);
measured 1 thread, load ~18 on 2 shared cores (noisy): 0-20% over F.linear at m = 48-128 rows on the
fine-grained and Mixtral shapes, within noise at m = 512 (F.linear packs the weight on every call;
the pack is a second copy of the weight, so it pays where the pack is a visible part of the call).

Cache: keyed by the weight's ROOT tensor (an expert's `w_in[e]` is a view of the layer's stacked
parameter), weakly (a freed parameter drops its packs), and per view by (storage offset, shape,
stride); each pack records the root's version counter, so an in-place update of the weights repacks.
Not packed (gemm.linear instead): non-float32, non-CPU, inference tensors (no version counter to
see an in-place update by; the weights of a loaded program are ordinary tensors), tensors that
require grad under grad mode, rows ≤ gemm.SMALL_M or what gemm.linear sends to skinny.py.
"""
from __future__ import annotations

import logging
import threading
import weakref

import torch
from torch import Tensor

from . import gemm, skinny

log = logging.getLogger("moecc.backends.torch.packed")

_MKL = getattr(torch.ops.mkl, "_mkl_linear", None) if torch.backends.mkl.is_available() else None
_DNN = (getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None)
BATCH = 64                      # the batch hint every pack is made with (one pack per weight)
# m·N·K (and m ≥ DNN_MIN_M) from which oneDNN's reordered GEMM beats skinny.py (1 thread, AVX-512 AMD EPYC,
# 2026-12-04, quiet): oneDNN costs ~10 µs a call, then a third of 8-lane skinny's time per FLOP. skinny at 16
# lanes vs oneDNN, µs: [192, 384] m = 8 10.6 / 14.9, 16: 18.1 / 18.2, 32: 33.8 / 27.5; [1536, 384] m = 2 28.1 /
# 34.7, 4: 37.2 / 36.2, 8: 71.0 / 55.0. At 8 lanes: [192, 384] m = 8 14.5 / 15.2, 16: 27.5 / 19.4
DNN_OVER_SKINNY = 2 ** 20 if skinny.LANES == 16 else 2 ** 19
DNN_MIN_M = 4
DNN_ACTS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
_PACKS: dict[int, tuple] = {}  # id(root) -> (weakref to root, {view key: (version, packed)})
_LOCK = threading.Lock()         # parallel.py's expert threads pack different experts at once


def _packs_of(root: Tensor) -> dict:
    with _LOCK:
        entry = _PACKS.get(id(root))
        if entry is None or entry[0]() is not root:           # new root (or an id reused after a free)
            ref = weakref.ref(root, lambda _r, k=id(root): _PACKS.pop(k, None))
            entry = _PACKS[id(root)] = (ref, {})
        return entry[1]


def available(library: str = "mkl") -> bool:
    return (_MKL if library == "mkl" else _DNN) is not None


def _packable(w: Tensor, library: str) -> bool:
    return (available(library) and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2
            and not w.is_inference() and not (w.requires_grad and torch.is_grad_enabled()))


def pack(w: Tensor, library: str = "mkl") -> Tensor | None:
    """The packed form of w [N, K] for `library` ("mkl" | "dnn"), made on first use and kept while
    w's root tensor lives."""
    if not _packable(w, library):
        return None
    root = w._base if w._base is not None else w
    key = (library, w.storage_offset(), tuple(w.shape), w.stride())
    version = root._version
    packs = _packs_of(root)
    hit = packs.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    if hit is not None:
        log.debug("weight %s changed in place (version %d -> %d): repacking", key, hit[0], version)
    with torch.no_grad():
        p = _reorder(w.contiguous()) if library == "mkl" else _reorder_dnn(w.contiguous())
    packs[key] = (version, p)
    return p


def _reorder(w: Tensor) -> Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(w, BATCH)


def _reorder_dnn(w: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w)


def _blas(a: Tensor, w: Tensor, library: str) -> bool:
    """Whether a [m, K] · w [N, K]ᵀ goes to the packed library (else gemm.linear): where gemm.linear
    would run a BLAS GEMM, and for oneDNN also where skinny.py would but oneDNN is faster."""
    if a.dtype != torch.float32:
        return False
    f = gemm.form(a, w)
    if f == "small" or (f == "skinny" and library == "mkl"):
        return False
    return f != "skinny" or (a.shape[0] >= DNN_MIN_M and a.shape[0] * w.numel() >= DNN_OVER_SKINNY)


def linear(a: Tensor, w: Tensor, b: Tensor | None = None, bias_after: bool = False,
           library: str = "mkl") -> Tensor:
    """gemm.linear, with the weight packed for `library` where gemm.linear would run a BLAS GEMM. "mkl":
    MKL's packed sgemm (gemm.linear's mkl form, and its dnn form for ≥ 4096 weight rows: MKL packed
    instead of oneDNN, F.linear's bits, not oneDNN's); "dnn": oneDNN's reordered weight (also where
    gemm.linear would run skinny.py and oneDNN is faster: DNN_OVER_SKINNY)."""
    if bias_after and b is not None:
        return linear(a, w, library=library).add_(b)
    p = pack(w, library) if _blas(a, w, library) else None
    if p is None:
        return gemm.linear(a, w, b)
    if library == "mkl":
        return torch.ops.mkl._mkl_linear(a.contiguous(), p, w, b, BATCH)
    return _DNN(a.contiguous(), p, b, "none", [], "")


def dnn_linear(a: Tensor, w: Tensor, b: Tensor | None = None, bias_after: bool = False) -> Tensor:
    """linear on oneDNN's reordered weight (grouped_gemm's `lin` for torch.dnn_gemm)."""
    return linear(a, w, b, bias_after, "dnn")


def dnn_linear_act(a: Tensor, w: Tensor, b: Tensor | None, activation: str) -> Tensor | None:
    """act(a · wᵀ + b) in ONE oneDNN call (the activation fused as its post-op: the [m, N] result is
    written once), for the activations in DNN_ACTS; None where oneDNN would not run this GEMM (the
    caller computes it unfused)."""
    attr = DNN_ACTS.get(activation)
    p = pack(w, "dnn") if attr is not None and _blas(a, w, "dnn") else None
    return None if p is None else _DNN(a.contiguous(), p, b, attr[0], [], attr[1])


def clear() -> None:
    """Drop every pack (tests; memory)."""
    _PACKS.clear()


__all__ = ["linear", "dnn_linear", "dnn_linear_act", "pack", "available", "clear", "BATCH"]
