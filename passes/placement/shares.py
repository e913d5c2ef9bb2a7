"""Share matrices: which devices take which part of each expert's tokens.

    share [L, E, D] float64   share[l, e, d] = the fraction of expert e's tokens (layer l) that device d
                              computes; device d holds a copy of e iff share > 0; every row sums to 1.

Every method produces one; `from_physical` builds it from a physical-slot layout where the copies of an
expert split its tokens evenly (as EPLB does).
"""
from __future__ import annotations

import numpy as np


def from_device_of(device_of: np.ndarray, devices: int) -> np.ndarray:
    """[L, E] device of each expert (one copy each) -> share [L, E, D]."""
    L, E = device_of.shape
    share = np.zeros((L, E, devices))
    share[np.arange(L)[:, None], np.arange(E)[None, :], device_of] = 1.0
    return share


def from_physical(expert_of: np.ndarray, device_of: np.ndarray, num_experts: int,
                  devices: int) -> np.ndarray:
    """Physical copies -> share [L, E, D]; a copy takes 1/count of its expert's tokens.

    expert_of [L, P]: logical expert held by physical copy p; device_of [L, P]: the device it sits on.
    """
    L, P = expert_of.shape
    layer = np.repeat(np.arange(L), P)
    count = np.zeros((L, num_experts))
    np.add.at(count, (layer, expert_of.ravel()), 1.0)
    share = np.zeros((L, num_experts, devices))
    np.add.at(share, (layer, expert_of.ravel(), device_of.ravel()),
              1.0 / count[layer, expert_of.ravel()])
    return share
