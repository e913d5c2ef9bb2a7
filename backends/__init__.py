"""Backends: each lowers an exported MoE program into an artifact directory and runs it back.

    backends.get(name).lower(program, out_dir, options) -> Lowered
    backends.runtime(name).load(artifact_dir, manifest) -> run(list[np.ndarray]) -> list[np.ndarray]

Runtimes import only their runtime library and numpy (no torch for onnx/tvm).
"""
from __future__ import annotations

import importlib

from moecc.errors import MoeccError

NAMES = ("torch", "onnx", "tvm")


def _module(name: str, part: str):
    if name not in NAMES:
        raise MoeccError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"moecc.backends.{name}.{part}")


def get(name: str):
    """The backend's lowering module (`lower(program, out_dir, options) -> Lowered`)."""
    return _module(name, "lower")


def runtime(name: str):
    """The backend's runtime module (`load(artifact_dir, manifest) -> run`)."""
    return _module(name, "runtime")
