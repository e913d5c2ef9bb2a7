"""Where graph's balance gap to EPLB on clustered traces comes from (the analysis in
passes/placement/README.md, "Balance").

    python samples/placement_balance_gap.py [--affinity 4] [--tokens 4096] [--seeds 3] [--draws 200]

Per synthetic trace (58 layers x 256 experts, top-8, 4x8:slots=9, 32 replicas), both plans made on
window i and scored on window i+1, four ways, as graph − EPLB:

    dispatched   balancedness as the metric counts it (each pair sent by the hash dispatch)
    fractional   device loads = shares x the next window's expert loads (no dispatch noise)
    node         the same, summed per node
    drift only   the plan's own window, expert loads times independent lognormal drift
                 (sigma = --sigma, --draws Monte Carlo draws): the part that is per-expert drift

If "node" carries the gap and "drift only" does not, the gap is correlated load between windows:
the token counts of the topics a node holds. That noise shrinks as 1/sqrt(tokens per window).
"""
from __future__ import annotations

import argparse

import numpy as np

from moecc.passes.placement import parse_topology, plan
from moecc.passes.placement.metrics import device_loads
from moecc.passes.placement.synthetic import synthetic_trace

WAYS = ("dispatched", "fractional", "node", "drift only")


def balancedness(loads: np.ndarray) -> float:
    """[..., L, D] -> sum over layers of the mean over the max (averaged over leading axes)."""
    return float(np.mean(loads.mean(-1).sum(-1) / loads.max(-1).sum(-1)))


def gaps(trace, topology, replicas: int, sigma: float, draws: int, rng) -> np.ndarray:
    """[pairs, 4] graph − EPLB per window pair, in the order of WAYS."""
    windows = [trace.select(w) for w in trace.windows()]
    G = topology.devices_per_node
    out = []
    for past, future in zip(windows[:-1], windows[1:]):
        w = past.load()
        drift = np.exp(rng.normal(0.0, sigma, size=(draws,) + w.shape))    # [draws, L, E]
        ahead = future.load()
        row = []
        for method in ("graph", "eplb"):
            p = plan(past, topology, method, replicas)
            frac = np.einsum("le,led->ld", ahead, p.share)
            nodes = frac.reshape(len(frac), -1, G).sum(-1)
            mc = np.einsum("rle,led->rld", w[None] * drift, p.share)
            row.append([balancedness(device_loads(p, future)), balancedness(frac),
                        balancedness(nodes), balancedness(mc)])
        out.append(np.subtract(*row))
    return np.array(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--affinity", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per window (default 4096)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--sigma", type=float, default=0.3, help="drift per window (synthetic's default)")
    a = ap.parse_args(argv)
    topology, rng = parse_topology("4x8:slots=9"), np.random.default_rng(0)
    rows = []
    for seed in range(a.seeds):
        trace = synthetic_trace(layers=58, experts=256, top_k=8, tokens=a.tokens, windows=a.windows,
                                affinity=a.affinity, seed=seed)
        rows.append(gaps(trace, topology, 32, a.sigma, a.draws, rng))
        print(f"trace {seed}: " + ", ".join(f"{n} {v:+.4f}" for n, v in zip(WAYS, rows[-1].mean(0))),
              flush=True)
    d = np.concatenate(rows)
    print(f"\naffinity {a.affinity}, {a.tokens} tokens per window, {len(d)} window pairs: "
          "balancedness graph − EPLB (mean ± standard error)\n")
    print("| " + " | ".join(WAYS) + " |\n|" + "---|" * len(WAYS))
    print("| " + " | ".join(f"{m:+.4f} ± {s:.4f}" for m, s in
                            zip(d.mean(0), d.std(0, ddof=1) / np.sqrt(len(d)))) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
