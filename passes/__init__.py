"""moecc passes, registered by name (an explicit table: no import-time registration).

Each pass module exposes `make(options: dict) -> Pass`, where a Pass is
`(gm: fx.GraphModule) -> moecc.pipeline.PassResult`. `--passes a,b` runs them in order.
"""
from __future__ import annotations

import importlib

from moecc.errors import MoeccError

REGISTRY = {
    "canonicalize": "canonicalize",   # ATen spellings → one form (matmul+t → linear, relu_ → relu, ...)
    "upcycle": "upcycle",             # dense FFN → MoE of E copies (sparse upcycling)
    "moefy": "moefy",                 # dense FFN → MoE of E disjoint neuron groups (MoEfication)
    "route": "route",                 # set / replace the router of MoE layers
    "expert_parallel": "expert_parallel",   # experts layers split over ranks (plan; rewrite at launch)
    "overlap": "overlap",             # EP layers in token chunks, all-to-alls behind compute (schedule.json)
}


def make(name: str, options: dict):
    if name not in REGISTRY:
        raise MoeccError(f"unknown pass {name!r}; available: {', '.join(REGISTRY)}")
    try:
        module = importlib.import_module(f"moecc.passes.{REGISTRY[name]}")
    except ModuleNotFoundError as e:
        raise MoeccError(f"pass {name!r} is not available in this build ({e})") from None
    return module.make(options)


def describe(name: str) -> str:
    module = importlib.import_module(f"moecc.passes.{REGISTRY[name]}")
    return (module.__doc__ or "").strip().splitlines()[0]
