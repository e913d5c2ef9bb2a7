"""The cluster experts are placed on: nodes × devices per node, expert slots per device, bandwidths.

Device d lives on node d // devices_per_node. Bandwidths are per device, in GB/s: `intra` between
devices of one node (NVLink-class), `inter` between nodes (network). Written as a string

    2x4:slots=10,intra=300,inter=25      (2 nodes × 4 devices, 10 expert slots each)

or as JSON {"nodes": 2, "devices_per_node": 4, "slots": 10, "intra_gbps": 300, "inter_gbps": 25}.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moecc.errors import MoeccError

_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?::(.*))?$")
_KEYS = {"slots": "slots", "intra": "intra_gbps", "inter": "inter_gbps"}


@dataclass(frozen=True)
class Topology:
    nodes: int
    devices_per_node: int
    slots: int                      # expert slots per device (replicas included)
    intra_gbps: float = 300.0
    inter_gbps: float = 25.0

    def __post_init__(self):
        for name in ("nodes", "devices_per_node", "slots"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise MoeccError(f"topology: {name} must be a positive integer, got {value}")
            object.__setattr__(self, name, int(value))
        for name in ("intra_gbps", "inter_gbps"):
            if not float(getattr(self, name)) > 0:
                raise MoeccError(f"topology: {name} must be > 0, got {getattr(self, name)}")
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def total_slots(self) -> int:
        return self.devices * self.slots

    def node_of(self, device):
        """Node index of a device id (works on ints and integer arrays)."""
        return device // self.devices_per_node

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.nodes}x{self.devices_per_node}:slots={self.slots},"
                f"intra={self.intra_gbps:g},inter={self.inter_gbps:g}")


def check_fits(topology: Topology, num_experts: int, replicas: int) -> None:
    """Raise unless E experts plus R replicas fit the topology's slots."""
    if replicas < 0:
        raise MoeccError(f"replicas must be >= 0, got {replicas}")
    need = num_experts + replicas
    if need > topology.total_slots:
        raise MoeccError(f"{num_experts} experts + {replicas} replicas = {need} exceed the "
                         f"{topology.devices} devices × {topology.slots} slots = "
                         f"{topology.total_slots} slots of topology {topology}")


def parse_topology(text: str) -> Topology:
    """A topology from a spec string (`2x4:slots=10,intra=300,inter=25`) or a JSON file path."""
    m = _SPEC.match(text)
    if m is None:
        path = Path(text)
        if path.suffix == ".json" or path.exists():
            return topology_from_json(path)
        raise MoeccError(f"topology: cannot parse {text!r}; expected NODESxDEVICES:slots=S[,intra="
                         "GBPS,inter=GBPS] (e.g. 2x4:slots=10,intra=300,inter=25) or a JSON file")
    kwargs: dict = {"nodes": int(m.group(1)), "devices_per_node": int(m.group(2))}
    for item in filter(None, (m.group(3) or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in _KEYS or not value.strip():
            raise MoeccError(f"topology: unknown or empty setting {item!r} in {text!r}; "
                             f"known: {', '.join(_KEYS)}")
        try:
            kwargs[_KEYS[key]] = float(value)
        except ValueError:
            raise MoeccError(f"topology: {key}={value!r} in {text!r} is not a number") from None
    if "slots" not in kwargs:
        raise MoeccError(f"topology: {text!r} does not say slots=S (expert slots per device)")
    return Topology(**kwargs)


def topology_from_json(path: str | Path) -> Topology:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoeccError(f"topology: cannot read {path}: {e}") from None
    fields = {"nodes", "devices_per_node", "slots", "intra_gbps", "inter_gbps"}
    unknown = set(doc) - fields
    missing = {"nodes", "devices_per_node", "slots"} - set(doc)
    if unknown or missing:
        raise MoeccError(f"topology: {path} has unknown keys {sorted(unknown)} / lacks "
                         f"{sorted(missing)}; keys are {sorted(fields)}")
    return Topology(**doc)
