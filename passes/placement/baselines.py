"""Naive placements, one copy per expert, no replicas (the "before" of every comparison).

    contiguous:   expert e -> device e * D // E     (blocks of neighbouring ids)
    round_robin:  expert e -> device e mod D
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

from .shares import from_device_of
from .topology import Topology, check_fits
from .trace import Trace


def contiguous(trace: Trace, topology: Topology, replicas: int = 0) -> np.ndarray:
    """share [L, E, D]: expert e on device e * D // E."""
    E, D = _check(trace, topology, replicas, "contiguous")
    device_of = np.arange(E) * D // E                                   # [E]
    return from_device_of(np.tile(device_of, (trace.num_layers, 1)), D)


def round_robin(trace: Trace, topology: Topology, replicas: int = 0) -> np.ndarray:
    """share [L, E, D]: expert e on device e mod D."""
    E, D = _check(trace, topology, replicas, "round_robin")
    return from_device_of(np.tile(np.arange(E) % D, (trace.num_layers, 1)), D)


def _check(trace: Trace, topology: Topology, replicas: int, method: str) -> tuple[int, int]:
    if replicas:
        raise MoeccError(f"method {method} places no replicas, but replicas={replicas} were asked "
                         "for; use replicas=0 (or the eplb / graph methods)")
    E, D = trace.num_experts, topology.devices
    check_fits(topology, E, 0)
    per_device = -(-E // D)
    if per_device > topology.slots:
        raise MoeccError(f"method {method} puts up to {per_device} of the {E} experts on one of "
                         f"{D} devices but each has {topology.slots} slots")
    return E, D
