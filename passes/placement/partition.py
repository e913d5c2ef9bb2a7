"""Balanced graph partitioning, B independent problems at once (one per layer, or layer and node).

    partition(affinity [B, n, n], anchor [B, n, P] | None, w [B, n], valid [B, n],
              max_count [B, P], max_load [B, P], group [B, n] | None) -> part [B, n]  (-1: invalid)

`affinity` may also be a function (b, i) -> the edge rows of items i of problems b ([..., n]), for
graphs too large to materialize, or None (no edges: balanced packing).

Each problem places n weighted items into P parts. Greedy, heaviest item first (or by `order_key`,
e.g. cluster by cluster), all problems in lockstep (step s places every problem's s-th item): an
item goes to the part with the most
affinity among those with a free slot and load room, affinity being the anchor (a fixed pull
towards a part) plus the edge weights to items already there, minus `spread` times what an item of
its load would get at random (w_i * load_p / W, modularity's null model), so heavy items spread.
A part keeps room for the lightest items that the other parts' free slots could not take. An item
that fits no part's load cap goes to the part with the least relative load. Items sharing a `group`
id (copies of one expert) share a part only when no other part has a free slot, and are split
apart afterwards where a swap allows. Then `repair` exchanges items out of parts over `final_load`.
"""
from __future__ import annotations

import numpy as np

from moecc.errors import MoeccError

CANDIDATES = 16     # repair tries this many items of a part over its cap, spread light to heavy


def partition(affinity, anchor, w, valid, max_count, max_load, group=None, spread=4.0,
              final_load=None, repair_rounds=None, order_key=None):
    """part [B, n] (see the module docstring); final_load [B, P] defaults to max_load.

    affinity: [B, n, n] edges, a function (b, i) -> their rows, or None (no edges: balanced
    packing). order_key [B, n]: items are taken by ascending key, heaviest first among equal keys
    (default: heaviest first)."""
    if affinity is None:
        edges = lambda b, i: np.zeros(np.broadcast(b, i).shape + (w.shape[1],))  # noqa: E731
    else:
        edges = affinity if callable(affinity) else (lambda b, i: affinity[b, i])
    B, n = w.shape
    P = max_count.shape[1]
    if (max_count.sum(1) < valid.sum(1)).any():
        b = int(np.argmax(valid.sum(1) - max_count.sum(1)))
        raise MoeccError(f"partition: {int(valid[b].sum())} items but only {int(max_count[b].sum())} "
                         f"slots in {P} parts")
    rows = np.arange(B)
    w = np.where(valid, w, 0.0)
    max_load = np.maximum(max_load, 1e-12)                                 # empty problems too
    spread = spread / np.maximum(w.sum(1), 1e-12)[:, None]                 # [B, 1]
    order = np.argsort(np.where(valid, -w, np.inf), axis=1, kind="stable")  # [B, n] heaviest first
    ws = np.take_along_axis(w, order, 1)                                    # [B, n]
    n_valid = valid.sum(1)                                                  # [B]
    # lightest[b, f] = total load of problem b's f lightest items
    lightest = np.concatenate([np.zeros((B, 1)), np.cumsum(
        np.take_along_axis(ws, (n_valid[:, None] - 1 - np.arange(n)) % n, 1)
        * (np.arange(n) < n_valid[:, None]), 1)], 1)                        # [B, n + 1]
    if order_key is not None:                               # by key, heaviest first within a key
        key = np.take_along_axis(np.where(valid, order_key, np.inf), order, 1)
        order = np.take_along_axis(order, np.argsort(key, axis=1, kind="stable"), 1)
        ws = np.take_along_axis(w, order, 1)
    grp = np.broadcast_to(np.arange(n), (B, n)) if group is None else np.where(valid, group, 0)
    g_ord = np.take_along_axis(grp, order, 1)                               # [B, n]
    score = np.zeros((B, P, n)) if anchor is None else np.ascontiguousarray(
        np.swapaxes(anchor, 1, 2), dtype=np.float64)                        # [B, P, n]
    part = np.full((B, n), -1, dtype=np.int64)
    load = np.zeros((B, P))
    count = np.zeros((B, P), dtype=np.int64)
    taken = np.zeros((B, int(grp.max(initial=0)) + 1, P), dtype=bool)     # [B, group, P]
    n_min = int(n_valid.min(initial=0))
    for s in range(int(n_valid.max(initial=0))):
        b = rows if s < n_min else rows[n_valid > s]                        # problems with a step s
        sel = slice(None) if s < n_min else b
        i, wi = order[sel, s], ws[sel, s][:, None]
        ld, free = load[sel], max_count[sel] - count[sel]
        ok = free > 0
        if group is not None:
            g = g_ord[sel, s]
            pref = ok & ~taken[b, g]
            ok = np.where(pref.any(1, keepdims=True), pref, ok)
        # p must still take the items the other parts' free slots cannot hold after this one:
        # keep at least the load of that many lightest items free
        forced = free - free.sum(1, keepdims=True) + (n_valid[sel] - s - 1)[:, None]
        need = ld + wi + lightest[b[:, None], np.minimum(np.maximum(forced, 0), n)]
        fits = ok & (need <= max_load[sel])
        key = np.where(fits, score[b, :, i] - spread[sel] * wi * ld, -np.inf)
        p = np.where(fits.any(1), np.argmax(key, 1),
                     np.argmin(np.where(ok, need / max_load[sel], np.inf), 1))
        part[b, i] = p
        load[b, p] += wi[:, 0]
        count[b, p] += 1
        if affinity is not None:
            score[b, p] += edges(b, i)
        if group is not None:
            taken[b, g, p] = True
    if group is None:                                       # each item its own group
        taken[rows[:, None], grp, np.maximum(part, 0)] = valid
    state = (edges, score, w, part, load, count, taken, grp)
    if group is not None:
        _unmerge(state, valid)
    final_load = max_load if final_load is None else np.clip(final_load, 1e-12, max_load)
    for _ in range(n if repair_rounds is None else repair_rounds):     # each round lowers the excess
        if not repair(state, max_count, final_load):
            break
    return part


def repair(state, max_count, max_load) -> bool:
    """One exchange in every problem that has a part over its load cap: that part (the one most
    over) gives one of CANDIDATES of its items (light to heavy) to a part with a free slot and
    room, or swaps it for a lighter item of another part, whichever removes most excess (affinity
    gained breaks near-ties). False when no problem could exchange anything."""
    edges, score, w, part, load, count, taken, grp = state
    B, P = load.shape
    n = w.shape[1]
    rel = (load - max_load) / max_load
    p = np.argmax(rel, 1)                                                   # [B]
    prob = np.flatnonzero(rel[np.arange(B), p] > 1e-12)
    if not len(prob):
        return False
    p = p[prob]
    b1, b3 = np.arange(len(prob))[:, None], np.arange(len(prob))[:, None, None]
    q = part[prob]                                                          # [b, n] part of each item
    wb = w[prob]
    by_weight = np.argsort(np.where(q == p[:, None], wb, np.inf), 1)        # [b, n] p's items first
    m = min(int(count[prob, p].max()), CANDIDATES)
    ranks = (np.arange(m)[None, :] * count[prob, p][:, None]) // m          # evenly spread ranks
    I = np.take_along_axis(by_weight, ranks, 1)                             # [b, m]
    real = q[b1, I] == p[:, None]                                           # [b, m]
    excess = (load[prob, p] - max_load[prob, p])[:, None, None]            # [b, 1, 1]
    qi = np.maximum(q, 0)
    wi = wb[b1, I]                                                          # [b, m]
    delta = wi[:, :, None] - wb[:, None, :]                                 # [b, m, n] p sheds
    held = taken[prob[:, None], grp[prob]]                                  # [b, n, P] by group
    sc = score[prob]                                                        # [b, P, n]
    s_p = sc[b1, p[:, None], np.arange(n)]                                  # [b, n] affinity to p
    s_own = sc[b1, qi, np.arange(n)]                                        # [b, n] to own part
    ok = (real[:, :, None] & ((q >= 0) & (q != p[:, None]))[:, None, :] & (delta > 0)
          & (load[prob][b1, qi][:, None, :] + delta <= max_load[prob][b1, qi][:, None, :])
          & ~held[b1, I][b3, np.arange(m)[None, :, None], qi[:, None, :]]
          & ~held[b1, np.arange(n), p[:, None]][:, None, :])
    # gain of swapping i (in p) with j (in q): both change sides; the i-j edge is counted twice
    gain = (sc[b3, qi[:, None, :], I[:, :, None]] - s_p[b1, I][:, :, None] + s_p[:, None, :]
            - s_own[:, None, :] - 2 * edges(prob[:, None], I))
    key = np.where(ok, np.minimum(delta, excess) + 0.1 * gain, -np.inf).reshape(len(prob), -1)
    # moves of i to a part r with a free slot and load room
    free = (count[prob] < max_count[prob]) & (np.arange(P)[None, :] != p[:, None])   # [b, P]
    move_ok = (real[:, :, None] & free[:, None, :] & ~held[b1, I]
               & (load[prob][:, None, :] + wi[:, :, None] <= max_load[prob][:, None, :]))
    move_key = np.where(move_ok, np.minimum(wi[:, :, None], excess)
                        + 0.1 * (sc[b3, np.arange(P), I[:, :, None]] - s_p[b1, I][:, :, None]),
                        -np.inf).reshape(len(prob), -1)
    best_swap, best_move = key.argmax(1), move_key.argmax(1)
    vs, vm = key[b1[:, 0], best_swap], move_key[b1[:, 0], best_move]
    go = np.isfinite(np.maximum(vs, vm))
    mv = go & (vm >= vs)
    sw = go & ~mv
    _move(state, prob[mv], I[b1[mv, 0], best_move[mv] // P], best_move[mv] % P)
    i_sw, j_sw = I[b1[sw, 0], best_swap[sw] // n], best_swap[sw] % n
    q_sw = part[prob[sw], j_sw]
    _move(state, prob[sw], j_sw, p[sw])
    _move(state, prob[sw], i_sw, q_sw)
    return bool(go.any())


def _unmerge(state, valid) -> None:
    """Where the greedy had to put two items of one group in one part, swap one of them with the
    item of most similar load that can trade places (neither part then holds a group twice)."""
    edges, score, w, part, load, count, taken, grp = state
    merged = taken.sum((1, 2)) < valid.sum(1)               # fewer (group, part) pairs than items
    for b in np.flatnonzero(merged).tolist():
        key = np.where(valid[b], grp[b] * (part.shape[1] + 1) + part[b], -1)
        _, first = np.unique(key, return_index=True)
        for i in np.setdiff1d(np.flatnonzero(valid[b]), first).tolist():   # 2nd+ copy in a part
            p, g = part[b, i], grp[b, i]
            j_ok = valid[b] & ~taken[b, g][part[b]] & ~taken[b, grp[b], p]
            if j_ok.any():
                j = int(np.flatnonzero(j_ok)[np.argmin(np.abs(w[b, j_ok] - w[b, i]))])
                q = part[b, j]
                rows = np.array([b])
                _move(state, rows, np.array([j]), np.array([p]))
                _move(state, rows, np.array([i]), np.array([q]))


def _move(state, b: np.ndarray, i: np.ndarray, q: np.ndarray) -> None:
    """Move item i[k] of problem b[k] to part q[k] (distinct problems), updating loads, counts,
    scores and group occupancy."""
    edges, score, w, part, load, count, taken, grp = state
    if not len(b):
        return
    p = part[b, i]
    part[b, i] = q
    load[b, p] -= w[b, i]                       # problems are distinct: plain indexing is safe
    load[b, q] += w[b, i]
    count[b, p] -= 1
    count[b, q] += 1
    row = edges(b, i)
    score[b, p] -= row
    score[b, q] += row
    g = grp[b, i]
    taken[b, g, p] = ((part[b] == p[:, None]) & (grp[b] == g[:, None])).any(1)
    taken[b, g, q] = True

