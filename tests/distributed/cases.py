"""Expert-parallel test problems: one global batch, split over ranks, and its single-process reference.

A case is a JSON-able dict: world, tokens per rank, E, k, H, F, dtype, routing scenario, placement
("contiguous" or a share matrix [E, W] with replicas), seed. `problem(case)` builds the same tensors in
every process; `reference(case)` runs torch.ops.moecc.experts on the concatenated batch (rank-major)
over the physical copies (one per expert without replicas: the plain op on the layer's weights).
"""
from __future__ import annotations

import numpy as np
import torch

from moecc.distributed.layout import LayerPlacement
from moecc.ops import call_experts
from moecc.passes.placement.metrics import dispatch
from moecc.spec import GATED, MoESpec, RouterSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def placement(case) -> LayerPlacement:
    if case.get("share") is None:
        return LayerPlacement.contiguous(f"layer{case['layer']}", case["E"], case["world"])
    return LayerPlacement(f"layer{case['layer']}", np.asarray(case["share"], float),
                          np.asarray(case.get("local", [False] * case["E"]), bool),
                          case.get("per_node", 1))


def spec(case) -> MoESpec:
    return MoESpec(num_experts=case["E"], hidden=case["H"], ffn=case["F"],
                   activation=case.get("act", "swiglu"), expert_bias=case.get("bias", False),
                   router=RouterSpec(top_k=case["k"]), name=f"layer{case['layer']}")


def order(case) -> np.ndarray:
    """Global token numbers in rank-major order: rank r's tokens are order[start_r : start_r + T_r].
    Contiguous by default; "round_robin": token t on rank t mod W (as placement metrics' home device)."""
    T = sum(case["tokens"])
    if case.get("round_robin"):
        return np.concatenate([np.arange(r, T, case["world"]) for r in range(case["world"])])
    return np.arange(T)


def rank_tokens(case, rank) -> np.ndarray:
    start = sum(case["tokens"][:rank])
    return order(case)[start:start + case["tokens"][rank]]


def _ids(case, T, g) -> torch.Tensor:
    E, k, kind = case["E"], case["k"], case["routing"]
    if kind == "given":
        return torch.tensor(case["ids"], dtype=torch.int64).reshape(T, k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    if kind == "one_expert":                      # every token's only choice: expert 0
        ids[:, 0] = case.get("hot", 0)
        ids[:, 1:] = -1
    elif kind == "skip_experts":                  # experts >= E/2 get nothing
        half = max(E // 2, k)
        ids = torch.stack([torch.randperm(half, generator=g)[:k] for _ in range(T)]) if T else ids
    elif kind == "drops":                         # random empty slots (capacity drops)
        ids[torch.rand(ids.shape, generator=g) < 0.3] = -1
    return ids


def problem(case):
    """-> dict of global tensors: x [T, H], ids [T, k], weights [T, k], w_in, w_out, b_in, b_out,
    grad [T, H] (the upstream gradient), counts [W] tokens per rank."""
    g = torch.Generator().manual_seed(case["seed"])
    dt = DTYPES[case["dtype"]]
    T, E, H, F = sum(case["tokens"]), case["E"], case["H"], case["F"]
    R = 2 * F if spec(case).activation in GATED else F
    p = {"x": torch.randn(T, H, generator=g, dtype=dt), "ids": _ids(case, T, g),
         "w_in": torch.randn(E, R, H, generator=g, dtype=dt) / H ** 0.5,
         "w_out": torch.randn(E, H, F, generator=g, dtype=dt) / F ** 0.5,
         "grad": torch.randn(T, H, generator=g, dtype=dt)}
    p["weights"] = torch.rand(p["ids"].shape, generator=g, dtype=dt) * (p["ids"] >= 0)
    if case.get("bias"):
        p["b_in"] = torch.randn(E, R, generator=g, dtype=dt)
        p["b_out"] = torch.randn(E, H, generator=g, dtype=dt)
    return p


def devices(case, ids: torch.Tensor) -> np.ndarray:
    """ids [T, k] in rank-major order -> [T, k] rank computing each pair (the runtime's rule:
    placement.metrics dispatch with the tokens' numbers; a token's node = its rank's node)."""
    pl = placement(case)
    owner = np.repeat(np.arange(case["world"]), case["tokens"])
    return dispatch(pl.share, ids.numpy(), pl.local, owner // pl.devices_per_node,
                    pl.devices_per_node, order(case))


def copies(case) -> list[tuple[int, int]]:
    """Physical copies (expert, rank), sorted by expert then rank."""
    share = placement(case).share
    return [(int(e), int(r)) for e, r in zip(*np.nonzero(share > 0))]


def reference(case) -> dict:
    """Single process on the rank-major concatenated batch, the same order: y and the gradients of x, weights and every physical copy's
    weights ([P, ...], copies() order) through torch.ops.moecc.experts."""
    p = problem(case)
    perm = torch.as_tensor(order(case))
    p = {n: (t[perm] if n in ("x", "ids", "weights", "grad") else t) for n, t in p.items()}
    cps = copies(case)
    phys = {c: i for i, c in enumerate(cps)}
    dev = devices(case, p["ids"])
    ids = p["ids"].clone()
    for t, s in zip(*np.nonzero(dev >= 0)):
        ids[t, s] = phys[(int(p["ids"][t, s]), int(dev[t, s]))]
    experts = [e for e, _ in cps]
    leaves = {n: p[n].clone().requires_grad_(True) for n in ("x", "weights")}
    for n in ("w_in", "w_out", "b_in", "b_out"):
        if n in p:
            leaves[n] = p[n][experts].clone().requires_grad_(True)
    y = call_experts(leaves["x"], ids, leaves["weights"], leaves["w_in"], leaves["w_out"],
                     spec(case), b_in=leaves.get("b_in"), b_out=leaves.get("b_out"))
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], p["grad"], allow_unused=True)
    out = {"y": y.detach(), **{f"grad_{n}": gr for n, gr in zip(names, grads)}}
    return out


ROUTINGS = ("random", "one_expert", "skip_experts", "drops")


def random_case(rng: np.random.Generator, layer: int, world: int) -> dict:
    """A random small case: routing kind, token counts (zeros included), E, k, dtype, placement
    (contiguous, or random copies with random shares)."""
    E = int(rng.integers(world, 3 * world + 1))
    k = int(rng.integers(1, min(E, 4) + 1))
    case = dict(layer=layer, world=world, tokens=rng.integers(0, 9, world).tolist(), E=E, k=k, H=8,
                F=6, dtype=str(rng.choice(list(DTYPES))), routing=str(rng.choice(ROUTINGS)),
                seed=int(rng.integers(1 << 30)), hot=int(rng.integers(E)))
    if rng.random() < 0.5:                        # a random plan with replicas
        share = np.zeros((E, world))
        for e in range(E):
            ranks = rng.choice(world, int(rng.integers(1, world + 1)), replace=False)
            share[e, ranks] = rng.dirichlet(np.ones(len(ranks)))
        case["share"] = share.tolist()
    return case
