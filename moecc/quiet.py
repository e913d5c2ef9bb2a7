"""Silence one known warning torch raises about its own internals, around moecc's calls that trigger it.

    with torch_internal_deprecations():   # copy.deepcopy(GraphModule), torch.onnx.export(...)
        ...

torch 2.13 deprecates `isinstance(treespec, LeafSpec)` and warns whenever its own deepcopy/pickle
path rebuilds a LeafSpec: a FutureWarning the user can do nothing about, printed by every compile.
Only that message is filtered, only inside the block; the user's own warnings are untouched.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

TORCH_INTERNAL = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


@contextlib.contextmanager
def torch_internal_deprecations():
    with warnings.catch_warnings():
        for message in TORCH_INTERNAL:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


# torch.export logs a traceback (ERROR, with its own handler) before raising a shape error that
# moecc then reports in one line: drop those records while moecc exports.
EXPORT_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch.fx.experimental.recording", "torch._dynamo", "torch.export", "torch._export")


def _drop(record) -> bool:
    return False


@contextlib.contextmanager
def export_logs_dropped():
    loggers = [logging.getLogger(n) for n in EXPORT_LOGGERS]
    for log in loggers:
        log.addFilter(_drop)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(_drop)
