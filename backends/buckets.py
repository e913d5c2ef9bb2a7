"""Token-count buckets for run-time kernel dispatch, shared by the ONNX (If nodes) and TVM (one library per
bucket) backends: the cheapest kernel per power-of-two token count, consecutive equal choices merged.

    plan(names, cost(name, T), first_only={"ort.moe_fused"}) -> [(k0, T1), (k1, T2), (k2, None)]
        k_i runs for T_i <= T < T_(i+1) (T_0 = 1); a first_only kernel only ever in the first bucket
    encode(prefix, plan) -> "prefix:k0@T1:k1@T2:k2"      decode(prefix, name) -> plan
    pick(plan, T) -> the kernel for T tokens             lows(plan) -> [1, T1, T2]
"""
from __future__ import annotations

from typing import Callable

SCAN = tuple(2 ** i for i in range(17))


def plan(names: list[str], cost: Callable[[str, int], float], first_only=(), scan=SCAN) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for T in scan:
        if out and out[-1][0] not in first_only:
            names = [n for n in names if n not in first_only]
        best = min((cost(n, T), n) for n in names)[1]
        if not out or out[-1][0] != best:
            if out:
                out[-1] = (out[-1][0], T)
            out.append((best, None))
    return out


def encode(prefix: str, plan: list[tuple[str, int | None]]) -> str:
    return prefix + ":" + ":".join(k if T is None else f"{k}@{T}" for k, T in plan)


def decode(prefix: str, name: str) -> list[tuple[str, int | None]]:
    out = []
    for part in name[len(prefix) + 1:].split(":"):
        k, _, T = part.partition("@")
        out.append((k, int(T) if T else None))
    return out


def lows(plan: list[tuple[str, int | None]]) -> list[int]:
    return [1] + [T for _, T in plan[:-1]]


def pick(plan: list[tuple[str, int | None]], tokens: int) -> str:
    return next(k for k, below in plan if below is None or tokens < below)
