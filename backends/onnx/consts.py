"""Constants and shape tensors for the ONNX emitters (onnxscript tracing inside torch.onnx's translation)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op


def ints(*v: int):
    """A 1-d int64 constant (shapes, axes, K of TopK)."""
    return op.Constant(value=ir.tensor(np.array(v, dtype=np.int64)))


def int0(v: int):
    """A 0-d int64 constant (Range bounds, Gather indices)."""
    return op.Constant(value=ir.tensor(np.array(v, dtype=np.int64)))


def arange(n: int):
    return op.Range(int0(0), int0(n), int0(1))


def scalar(v: float, like):
    """A 0-d constant in `like`'s dtype."""
    return op.CastLike(op.Constant(value=ir.tensor(np.array(v, dtype=np.float64))), like)


def shape(*dims):
    """Concat of 1-d int64 pieces and Python ints into a shape tensor."""
    return op.Concat(*(ints(d) if isinstance(d, int) else d for d in dims), axis=0)
