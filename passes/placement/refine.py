"""Communities before the greedy, Kernighan-Lin swaps after it; batched over many problems in numpy.

    communities(A, w, valid)              -> label [B, n]   label propagation (the greedy's order)
    refine(A, w, part, valid, max_load)   -> part [B, n]    pairwise swaps between parts

A [B, n, n] are explicit symmetric edge weights with a zero diagonal (the copies' co-activation),
w [B, n] item loads, valid [B, n] real items (the rest is padding).

Why: the greedy (partition.py) takes items heaviest first, so the first items of one cluster of
co-activated experts land on different parts before their neighbours are placed, and the cluster
ends up split. Ordering the greedy cluster by cluster (heaviest cluster first) lets the cluster's
first item pull the rest after it; the swaps then mend what the load caps forced apart.
"""
from __future__ import annotations

import numpy as np


def communities(A, w, valid, neighbours: int = 8, iters: int = 4, seed: int = 0) -> np.ndarray:
    """Label propagation over each item's `neighbours` strongest edges, the edges measured against
    modularity's null model (A_ij - w_i w_j / W, so popular items do not attract everything).
    Labels start as the item's own index; each round a random half of the items takes the label
    with the largest summed edge weight among its neighbours (if larger than its own label's). -> label [B, n] (an item index)."""
    B, n = w.shape
    K = max(min(neighbours, n - 1), 1)
    wf = np.where(valid, w, 0.0).astype(np.float32)
    gain = np.multiply(-wf[:, :, None], (wf / np.maximum(wf.sum(1, keepdims=True), 1e-12))[:, None, :])
    gain += A
    gain += np.where(valid, 0.0, -np.inf).astype(np.float32)[:, None, :]
    idx = np.arange(n)
    gain[:, idx, idx] = -np.inf
    rows, rows3 = np.arange(B)[:, None], np.arange(B)[:, None, None]
    nb = np.empty((B, n, K), dtype=np.int64)
    wt = np.empty((B, n, K), dtype=np.float32)
    for j in range(K):                              # K argmax passes beat one argpartition here
        nb[:, :, j] = best = gain.argmax(2)
        wt[:, :, j] = gain[rows, idx, best]
        gain[rows, idx, best] = -np.inf
    wt = np.where(np.isfinite(wt) & valid[:, :, None], np.maximum(wt, 0.0), 0.0)
    label = np.broadcast_to(idx, (B, n)).copy()
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        cand = label[rows3, nb]                                             # [B, n, K]
        same = (cand[:, :, :, None] == cand[:, :, None, :]).astype(np.float32)   # [B, n, K, K]
        sc = (same @ wt[:, :, :, None])[..., 0]                             # [B, n, K]
        pick = sc.argmax(2)
        best = np.take_along_axis(cand, pick[:, :, None], 2)[:, :, 0]
        top = np.take_along_axis(sc, pick[:, :, None], 2)[:, :, 0]
        own = ((cand == label[:, :, None]) * wt).sum(2)                     # ties keep the label
        go = (top > own) & valid
        label = np.where(go & (rng.random((B, n)) < 0.5), best, label)
    return label


def community_order(label, w, valid) -> np.ndarray:
    """A sort key [B, n] for partition's `order_key`: heaviest community first, a community's
    items together (ties in the key keep partition's heaviest-item-first order inside it)."""
    B, n = w.shape
    total = np.zeros((B, n))
    np.add.at(total, (np.repeat(np.arange(B), n), label.ravel()), np.where(valid, w, 0.0).ravel())
    rank = np.argsort(np.argsort(-total, 1, kind="stable"), 1)              # [B, n] label's rank
    return np.take_along_axis(rank, label, 1)


def modularity(A, label, w) -> np.ndarray:
    """Newman's modularity of each problem's labels: A [B, n, n], label [B, n], w [B, n] item
    loads (the null model's degrees) -> [B]: the share of edge weight inside labels minus the
    share expected by chance. ~0 for noise; planted clusters score far higher."""
    B, n = w.shape
    inside = np.einsum("bij,bij->b", A, (label[:, :, None] == label[:, None, :]).astype(A.dtype))
    rows = np.repeat(np.arange(B), n)
    per = np.bincount(rows * n + label.ravel(), w.ravel(), B * n).reshape(B, n)   # label loads
    total = np.maximum(w.sum(1), 1e-12)
    return inside / np.maximum(A.sum((1, 2)), 1e-12) - ((per / total[:, None]) ** 2).sum(1)


def refine(A, w, part, valid, max_load, rounds: int = 1, anchor=None, top: int = 16) -> np.ndarray:
    """Kernighan-Lin-style swaps, batched: part [B, n] (from partition) -> part [B, n], every part
    keeping its item count (slots) and staying under max(max_load [B, P], its load now).

    For each pair of parts (p, q) in turn: the `top` items of p with the largest gain of going to
    q (edges to q minus edges to p, plus the anchor's pull) and the `top` of q with the largest
    gain of going to p are paired as in Kernighan-Lin: the pair of largest gain (the two gains
    minus twice their own edge) first, the others' gains updated as if it were swapped, and so on;
    the prefix of that sequence with the largest total gain that leaves both loads under their
    caps is swapped. anchor [B, n, P]: fixed pull of each part on each item."""
    B, n = w.shape
    P = max_load.shape[1]
    if P < 2:
        return part
    part = part.copy()
    w = np.where(valid, w, 0.0)
    rows = np.arange(B)[:, None]
    K = min(n, top)
    for _ in range(rounds):
        X = np.zeros((B, n, P), dtype=np.float32)
        X[rows, np.arange(n), np.maximum(part, 0)] = valid
        S = A @ X                                                           # [B, n, P] affinity
        for p in range(P):
            for q in range(p + 1, P):
                at_p, at_q = valid & (part == p), valid & (part == q)
                g = S[:, :, q] - S[:, :, p]                                 # [B, n] p -> q gain
                if anchor is not None:
                    g = g + anchor[:, :, q] - anchor[:, :, p]
                load_p, load_q = (w * at_p).sum(1), (w * at_q).sum(1)
                cap_p = np.maximum(max_load[:, p], load_p)
                cap_q = np.maximum(max_load[:, q], load_q)
                gi = np.where(at_p, g, -np.inf)
                gj = np.where(at_q, -g, -np.inf)
                oi = np.argsort(-gi, 1)[:, :K]                              # best candidates
                oj = np.argsort(-gj, 1)[:, :K]
                pair = (np.take_along_axis(gi, oi, 1)[:, :, None] + np.take_along_axis(gj, oj, 1)[:, None, :]
                        - 2 * A[rows[:, :, None], oi[:, :, None], oj[:, None, :]])   # [B, K, K]
                oi, oj, gain = _pairs(A, pair, oi, oj)                      # [B, K] in order
                total = np.cumsum(gain, 1)
                shed = np.cumsum(np.take_along_axis(w, oi, 1) - np.take_along_axis(w, oj, 1), 1)
                fits = ((load_p[:, None] - shed <= cap_p[:, None] * (1 + 1e-12))
                        & (load_q[:, None] + shed <= cap_q[:, None] * (1 + 1e-12)))
                best = np.where(fits, total, -np.inf)
                last = np.where(best.max(1) > 1e-9, best.argmax(1), -1)      # [B] best prefix
                take = np.arange(K)[None, :] <= last[:, None]              # [B, K]
                b, r = np.nonzero(take)
                part[b, oi[b, r]] = q
                part[b, oj[b, r]] = p
                if take.any():                  # S follows the swaps (A is symmetric: rows)
                    moved = np.einsum("bk,bkn->bn", take.astype(np.float32),
                                      A[rows, oi] - A[rows, oj])            # [B, n]
                    S[:, :, q] += moved
                    S[:, :, p] -= moved
    return part


def _pairs(A, pair, oi, oj):
    """Kernighan-Lin's sequence: pair [B, K, K] gains of swapping candidate a (of p, items oi)
    with candidate b (of q, items oj) -> (items [B, K], items [B, K], gains [B, K]): repeatedly
    the pair of largest gain, the other candidates' gains updated as if it were swapped."""
    pair = pair.copy()
    B, K, _ = pair.shape
    rows, rows2 = np.arange(B), np.arange(B)[:, None]
    a_ii = A[rows2[:, :, None], oi[:, :, None], oi[:, None, :]]            # [B, K, K] among p's
    a_jj = A[rows2[:, :, None], oj[:, :, None], oj[:, None, :]]            # among q's
    a_ij = A[rows2[:, :, None], oi[:, :, None], oj[:, None, :]]            # p's x q's
    out_i, out_j = np.empty((B, K), np.int64), np.empty((B, K), np.int64)
    gain = np.empty((B, K))
    for r in range(K):
        a, b = np.divmod(pair.reshape(B, -1).argmax(1), K)
        gain[:, r] = pair[rows, a, b]
        out_i[:, r], out_j[:, r] = oi[rows, a], oj[rows, b]
        # oi[a] went p -> q, oj[b] went q -> p: p's candidates gain 2 A[., i] - 2 A[., j] toward
        # q, q's candidates 2 A[., j] - 2 A[., i] toward p
        dp = 2 * (a_ii[rows, :, a] - a_ij[rows, :, b])                      # [B, K]
        dq = 2 * (a_jj[rows, :, b] - a_ij[rows, a, :])
        pair += dp[:, :, None] + dq[:, None, :]
        pair[rows, a, :] = -np.inf
        pair[rows, :, b] = -np.inf
    gain[~np.isfinite(gain)] = -np.inf
    return out_i, out_j, gain
