"""moecc: a compiler for Mixture-of-Experts models on torch.fx.

`import moecc` stays light (no torch) so that `moecc run` can serve ONNX/TVM artifacts without torch;
the `torch.ops.moecc.*` ops are registered when torch is already imported, on first use of the API,
or explicitly with `import moecc.ops`. `moecc.load(path)` loads a saved torch artifact.
"""
import sys

from .errors import MoeccError

__version__ = "0.1.0"
__all__ = ["MoeccError", "__version__", "MoESpec", "RouterSpec", "capture", "transform", "compile", "load"]

if "torch" in sys.modules:
    from . import ops  # noqa: F401  (defines torch.ops.moecc.moe before any torch.export.load)

_LAZY = {"MoESpec": "spec", "RouterSpec": "spec", "capture": "frontend", "transform": "api",
         "compile": "api", "load": "api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        importlib.import_module(".ops", __name__)
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moecc' has no attribute {name!r}")
