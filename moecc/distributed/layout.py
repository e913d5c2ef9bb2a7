"""Where each (token, slot) of a rank's batch is computed, and the order rows travel in.

    LayerPlacement        one layer of placement.json: share [E, W], node-local experts, the experts
                          rank r holds (replicas included, ascending) = its local expert ids 0..E_r-1
    layout(ids, placement, rank, tokens, node) -> Layout

The device of each (token, expert) pair is `moecc.passes.placement.metrics.dispatch` itself (the
rule placement.json documents: hash u_t of the token's global number t against the cumulative
shares of the expert's copies; node-local experts to a copy on the token's node), so the traffic
`moecc plan` scores is the traffic that runs.

What travels (fixed, documented order): a token's hidden state once per (token, destination rank)
(the `device_sends` of placement metrics: a token whose experts share a rank is sent there once),
grouped by destination rank, tokens ascending inside a group; per (token, slot) pair its routing
weight, its expert's local id and the index of its hidden row, grouped by destination, in (token,
slot) order inside a group. A rank receives in source-rank order, so the pairs of each local expert
reach it in (source rank, token, slot) order: with tokens numbered rank-major, exactly the order in
which `experts_reference` on the concatenated batch takes them (torch.where, row-major).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moecc.errors import MoeccError
from moecc.passes.placement.graphs import token_node
from moecc.passes.placement.metrics import dispatch


@dataclass(frozen=True, eq=False)
class LayerPlacement:
    name: str
    share: np.ndarray                  # [E, W] fraction of expert e's tokens computed on rank w
    local: np.ndarray                  # [E] bool: node-local experts
    devices_per_node: int = 1

    @property
    def num_experts(self) -> int:
        return self.share.shape[0]

    @property
    def world(self) -> int:
        return self.share.shape[1]

    def held(self, rank: int) -> list[int]:
        """Expert ids rank `rank` holds, ascending; position = the local expert id."""
        return np.flatnonzero(self.share[:, rank] > 0).tolist()

    @staticmethod
    def contiguous(name: str, num_experts: int, world: int) -> "LayerPlacement":
        """Expert e on rank e * W // E (as the placement baseline `contiguous`), one copy each."""
        if num_experts < world:
            raise MoeccError(f"layer {name}: {num_experts} experts cannot be spread over {world} "
                             "ranks without replicas; give a placement.json with replicas")
        share = np.zeros((num_experts, world))
        share[np.arange(num_experts), np.arange(num_experts) * world // num_experts] = 1.0
        return LayerPlacement(name, share, np.zeros(num_experts, bool), 1)

    @staticmethod
    def from_plan(plan, layer: int) -> "LayerPlacement":
        return LayerPlacement(plan.layers[layer], np.asarray(plan.share[layer]),
                              np.asarray(plan.local[layer]), plan.topology.devices_per_node)

    def fingerprint(self) -> int:
        """A 63-bit digest of the layer's placement (ranks compare it before running)."""
        import hashlib

        h = hashlib.sha256(np.round(self.share, 9).tobytes() + self.local.tobytes()
                           + str(self.devices_per_node).encode())
        return int.from_bytes(h.digest()[:8], "little") >> 1


@dataclass(frozen=True, eq=False)
class Layout:
    """What one rank sends for one layer call, in send order."""
    token: Tensor                      # [N] token (row of x) of each sent (token, slot) pair
    slot: Tensor                       # [N] its slot in ids
    local_id: Tensor                   # [N] the expert's local id on the destination rank
    pair_row: Tensor                   # [N] index of its hidden row among the rows sent to that rank
    send: list[int]                    # [W] pairs to each rank
    row_token: Tensor                  # [M] token of each sent hidden row (distinct (token, rank))
    row_send: list[int]                # [W] hidden rows to each rank
    device: np.ndarray                 # [T, S] rank computing each (token, slot); -1 = empty

    def node(self, before: np.ndarray, placement: LayerPlacement) -> np.ndarray:
        """[T] each token's node for the next layer (placement.graphs.token_node, as metrics)."""
        G = placement.devices_per_node
        return token_node(np.where(self.device >= 0, self.device // G, -1),
                          max(placement.world // G, 1), before)


def layout(ids: Tensor, placement: LayerPlacement, rank: int, tokens: np.ndarray,
           node: np.ndarray | None = None) -> Layout:
    """ids [T, S] (int64, -1 empty) -> Layout. tokens [T]: the tokens' global numbers (the hash);
    node [T]: the tokens' nodes (node-local experts; default: this rank's node)."""
    E, W, G = placement.num_experts, placement.world, placement.devices_per_node
    ids_np = ids.detach().cpu().numpy().astype(np.int64)
    if ids_np.size and ids_np.max(initial=-1) >= E:
        raise MoeccError(f"layer {placement.name}: expert id {int(ids_np.max())} >= {E} experts "
                         "of the placement")
    if node is None:
        node = np.full(ids_np.shape[0], rank // G)
    device = dispatch(placement.share, ids_np, placement.local, node, G, tokens)   # [T, S]
    tok, slot = np.nonzero(device >= 0)                                     # row-major
    dest = device[tok, slot]
    order = np.argsort(dest, kind="stable")                                 # by rank, then (t, s)
    tok, slot, dest = tok[order], slot[order], dest[order]
    local_of = np.full((W, E), -1)                                          # expert -> local id
    for r in range(W):
        held = placement.held(r)
        local_of[r, held] = np.arange(len(held))
    local_id = local_of[dest, ids_np[tok, slot]]
    T = ids_np.shape[0]
    key, pair_row = np.unique(dest * T + tok, return_inverse=True)         # rows: (rank, token)
    row_send = np.bincount(key // max(T, 1), minlength=W) if T else np.zeros(W, np.int64)
    start = np.concatenate([[0], np.cumsum(row_send)[:-1]])
    as_t = lambda a: torch.as_tensor(np.asarray(a, np.int64), device=ids.device)   # noqa: E731
    return Layout(as_t(tok), as_t(slot), as_t(local_id), as_t(pair_row.reshape(-1) - start[dest]),
                  np.bincount(dest, minlength=W).tolist(), as_t(key % max(T, 1)),
                  row_send.tolist(), device)
