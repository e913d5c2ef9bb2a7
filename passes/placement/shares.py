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


def even_out(share: np.ndarray, w: np.ndarray, rounds: int = 64, floor: float = 0.05,
             fixed: np.ndarray | None = None) -> np.ndarray:
    """Shift token shares between the copies of replicated experts towards the least loaded device.

    share [L, E, D], w [L, E] expert loads -> share [L, E, D]. Per round and layer: the busiest
    device hands part of one of its replicated experts to the least loaded other device holding a
    copy of it (up to halving their difference); every copy keeps at least `floor` of an even
    split. Copies and slots do not change; experts marked `fixed` [L, E] keep their shares."""
    share = share.copy()
    L, E, D = share.shape
    count = (share > 0).sum(2) * (True if fixed is None else ~fixed)        # [L, E]
    R = int((count > 1).sum(1).max(initial=0))
    if R == 0:
        return share
    rep = np.argsort(count < 2, axis=1, kind="stable")[:, :R]               # [L, R] replicated first
    ok = np.take_along_axis(count > 1, rep, 1)                              # [L, R]
    rows = np.arange(L)
    sub = share[rows[:, None], rep]                                         # [L, R, D]
    wr = np.take_along_axis(w, rep, 1)                                      # [L, R]
    held = (sub > 0) & ok[:, :, None]
    least = floor / np.maximum(np.take_along_axis(count, rep, 1), 1)        # [L, R] min share
    load = np.einsum("le,led->ld", w, share)                                # [L, D]
    for _ in range(rounds):
        hi = load.argmax(1)                                                 # [L]
        on_hi = held[rows, :, hi]                                           # [L, R]
        partner_load = np.where(held, load[:, None, :], np.inf)
        partner_load[rows, :, hi] = np.inf
        to = partner_load.argmin(2)                                         # [L, R]
        gap = (load[rows, hi][:, None] - partner_load.min(2)) / 2
        give = np.where(on_hi, np.minimum(gap, (sub[rows, :, hi] - least) * wr), 0.0)   # tokens
        e = give.argmax(1)
        amount = give[rows, e]
        go = amount > 1e-9 * np.maximum(load.max(1), 1e-12)
        if not go.any():
            break
        r, e, d = rows[go], e[go], to[rows, e][go]
        moved = amount[go] / wr[r, e]
        sub[r, e, hi[go]] -= moved
        sub[r, e, d] += moved
        load[r, hi[go]] -= amount[go]
        load[r, d] += amount[go]
    share[rows[:, None], rep] = np.where(ok[:, :, None], sub, share[rows[:, None], rep])
    return share
