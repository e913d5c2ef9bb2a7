"""The placement plan: which devices hold which experts, and which share of its tokens each copy takes.

    plan(trace, topology, method, replicas) -> Plan        (methods: METHODS)
    save_plan(plan, "placement.json") / load_plan(path)    (format in README.md)

A Plan is frozen and checked on construction: every expert of every layer is placed, its shares sum
to 1, no device holds more experts than it has slots. `local` marks node-local experts: a token's
choice of one goes to its copies on the token's own node where there are any (metrics.dispatch).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from moecc.errors import MoeccError

from .baselines import contiguous, round_robin
from .eplb import eplb
from .graph_planner import graph_plan
from .topology import Topology
from .trace import Trace

FORMAT = "moecc.placement/1"
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "contiguous": contiguous, "round_robin": round_robin, "eplb": eplb, "graph": graph_plan}
_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class Plan:
    method: str
    topology: Topology
    share: np.ndarray                # [L, E, D] fraction of expert e's tokens computed on device d
    layers: tuple[str, ...]
    planning_s: float = 0.0
    options: dict = field(default_factory=dict)
    local: np.ndarray | None = None  # [L, E] bool: node-local experts (default: none)

    def __post_init__(self):
        share = np.asarray(self.share, dtype=np.float64)
        if share.ndim != 3 or share.shape[0] != len(self.layers):
            raise MoeccError(f"plan: share must be [layers={len(self.layers)}, experts, devices], "
                             f"got shape {share.shape}")
        local = np.zeros(share.shape[:2], bool) if self.local is None else np.asarray(self.local, bool)
        if local.shape != share.shape[:2]:
            raise MoeccError(f"plan: local must be [layers, experts] = {share.shape[:2]}, got "
                             f"{local.shape}")
        local.flags.writeable = False
        object.__setattr__(self, "local", local)
        if share.shape[2] != self.topology.devices:
            raise MoeccError(f"plan: share covers {share.shape[2]} devices but topology "
                             f"{self.topology} has {self.topology.devices}")
        share = np.where(share < _TOL, 0.0, share)
        check(share, self.topology, self.layers)
        share.flags.writeable = False
        object.__setattr__(self, "share", share)

    @property
    def num_experts(self) -> int:
        return self.share.shape[1]

    @property
    def held(self) -> np.ndarray:
        """[L, E, D] bool: device d holds a copy of expert e."""
        return self.share > 0

    @property
    def replicas(self) -> int:
        """The most extra copies (beyond one per expert) that any layer uses."""
        return int((self.held.sum((1, 2)) - self.num_experts).max(initial=0))

    def device_experts(self, layer: int) -> list[list[int]]:
        """Per device, the expert ids it holds (replicas included), ascending."""
        return [np.flatnonzero(col).tolist() for col in self.held[layer].T]

    def expert_devices(self, layer: int) -> list[list[tuple[int, float]]]:
        """Per expert, (device, share of the expert's tokens) for each device holding it."""
        return [[(int(d), float(row[d])) for d in np.flatnonzero(row)] for row in self.share[layer]]


def check(share: np.ndarray, topology: Topology, layers) -> None:
    """Raise unless every expert is placed with shares summing to 1 and slots are respected."""
    if (share < 0).any():
        raise MoeccError("plan: negative share")
    total = share.sum(-1)                                                   # [L, E]
    bad = np.argwhere(np.abs(total - 1.0) > 1e-6)
    if len(bad):
        layer, e = bad[0]
        raise MoeccError(f"plan: expert {e} of layer {layers[layer]} has shares summing to "
                         f"{total[layer, e]:.6f}, not 1" + (" (not placed)" if total[layer, e] == 0
                                                            else ""))
    used = (share > 0).sum(1)                                               # [L, D]
    over = np.argwhere(used > topology.slots)
    if len(over):
        layer, d = over[0]
        raise MoeccError(f"plan: device {d} holds {used[layer, d]} experts in layer {layers[layer]} "
                         f"but has {topology.slots} slots")


def plan(trace: Trace, topology: Topology, method: str = "graph", replicas: int = 0,
         **options) -> Plan:
    """Place the trace's experts on the topology with `method` and `replicas` extra copies per layer."""
    if method not in METHODS:
        raise MoeccError(f"unknown placement method {method!r}; known: {', '.join(METHODS)}")
    start = time.perf_counter()
    share = METHODS[method](trace, topology, replicas, **options)
    elapsed = time.perf_counter() - start
    share, local = share if isinstance(share, tuple) else (share, None)
    return Plan(method, topology, share, trace.layers, elapsed, dict(options, replicas=replicas),
                local)


def to_json(p: Plan) -> dict:
    return {
        "format": FORMAT, "method": p.method, "topology": p.topology.to_dict(),
        "num_experts": p.num_experts, "planning_s": round(p.planning_s, 6), "options": p.options,
        "layers": [dict({"name": name, "devices": p.device_experts(i),
                         "experts": [[[d, round(s, 9)] for d, s in row] for row in p.expert_devices(i)]},
                        **({"local": np.flatnonzero(p.local[i]).tolist()} if p.local[i].any() else {}))
                   for i, name in enumerate(p.layers)],
    }


def from_json(doc: dict) -> Plan:
    if doc.get("format") != FORMAT:
        raise MoeccError(f"plan: format {doc.get('format')!r}, expected {FORMAT!r}")
    topology = Topology(**doc["topology"])
    E, layers = int(doc["num_experts"]), doc["layers"]
    share = np.zeros((len(layers), E, topology.devices))
    local = np.zeros((len(layers), E), bool)
    for i, layer in enumerate(layers):
        ids = layer.get("local", [])
        if any(not 0 <= e < E for e in ids):
            raise MoeccError(f"plan: layer {layer['name']}: 'local' lists experts outside 0..{E - 1}")
        local[i, ids] = True
        if len(layer["experts"]) != E:
            raise MoeccError(f"plan: layer {layer['name']} lists {len(layer['experts'])} experts, "
                             f"num_experts is {E}")
        for e, row in enumerate(layer["experts"]):
            for d, s in row:
                if not 0 <= d < topology.devices:
                    raise MoeccError(f"plan: expert {e} of layer {layer['name']} on device {d}, "
                                     f"outside 0..{topology.devices - 1}")
                share[i, e, d] += s
        held = [sorted(x) for x in layer["devices"]]
        if held != [np.flatnonzero(col).tolist() for col in share[i].T > 0]:
            raise MoeccError(f"plan: layer {layer['name']}: 'devices' and 'experts' disagree")
    return Plan(doc["method"], topology, share, tuple(x["name"] for x in layers),
                float(doc.get("planning_s", 0.0)), dict(doc.get("options", {})), local)


def save_plan(p: Plan, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(p), indent=1))


def load_plan(path: str | Path) -> Plan:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MoeccError(f"plan: cannot read {path}: {e}") from None
    return from_json(doc)
