"""moecc: a compiler for Mixture-of-Experts models on torch.fx.

Importing moecc registers the `torch.ops.moecc.*` ops (needed before `torch.export.load` of an artifact).
"""
from . import ops  # noqa: F401  (defines torch.ops.moecc.moe)
from .errors import MoeccError
from .spec import MoESpec, RouterSpec

__version__ = "0.1.0"
__all__ = ["MoESpec", "RouterSpec", "MoeccError", "__version__"]
