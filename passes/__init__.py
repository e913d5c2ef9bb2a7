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

_ROUTE = ("router", "top_k", "capacity_factor", "renormalize", "scaling", "n_groups", "topk_groups",
          "group_score", "layers")
OPTIONS = {                           # the options each pass reads; any other key is a mistake
    "canonicalize": (),
    "upcycle": ("num_experts", "top_k", "layers", "router_init", "seed"),
    "moefy": ("num_experts", "top_k", "layers", "method", "shared", "calibration", "seed", "refit",
              "moefy_router", "heal", "heal_params", "heal_lr"),
    "route": _ROUTE,
    "expert_parallel": ("ep", "placement", "capacity_scope", "overlap_degree"),
    "overlap": ("ep", "placement", "capacity_scope", "overlap_degree", "constants"),
}
INTERNAL = ("captured", "tokenize")   # given by moecc itself (the captured model, the factory's tokenizer)


def accepted_options(name: str) -> tuple[str, ...]:
    return OPTIONS.get(name, ()) + INTERNAL


def check(passes) -> list[tuple[str, dict]]:
    """A pass list as the API takes it, [(name, options), ...], with known names and options."""
    example = '[("upcycle", {"num_experts": 8, "top_k": 2})]'
    if isinstance(passes, (str, bytes, dict)) or not isinstance(passes, (list, tuple)):
        raise MoeccError(f"passes must be a list of (name, options) pairs, e.g. {example}; "
                         f"got a {type(passes).__name__}")
    for item in passes:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise MoeccError(f"passes must be a list of (name, options) pairs, e.g. {example}; got {item!r}")
        _check_one(*item)
    return [(n, dict(o)) for n, o in passes]


def _check_one(name: str, options: dict) -> None:
    if name not in REGISTRY:
        raise MoeccError(f"unknown pass {name!r}; available: {', '.join(REGISTRY)}")
    if not isinstance(options, dict):
        raise MoeccError(f"pass {name!r}: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(accepted_options(name)))
    if unknown:
        raise MoeccError(f"pass {name!r}: unknown option {unknown[0]!r}; it takes "
                         f"{', '.join(OPTIONS.get(name, ())) or 'no options'}")


def make(name: str, options: dict):
    _check_one(name, options)
    try:
        module = importlib.import_module(f"moecc.passes.{REGISTRY[name]}")
    except ModuleNotFoundError as e:
        raise MoeccError(f"pass {name!r} is not available in this build ({e})") from None
    return module.make(options)


def describe(name: str) -> str:
    module = importlib.import_module(f"moecc.passes.{REGISTRY[name]}")
    return (module.__doc__ or "").strip().splitlines()[0]
