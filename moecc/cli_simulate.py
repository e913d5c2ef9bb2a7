"""`moecc simulate`: the expert-parallel cost model on the command line (moecc.simulate).

    add_simulate_parser(subparsers)     wired into moecc/cli.py
"""
from __future__ import annotations

import argparse

from .errors import MoeccError

EPILOG = """examples:
  moecc simulate --nodes 4 --devices 8 --tokens 4096 --hidden 7168 --ffn 2048 --experts 256 --top-k 8 \\
                 --gated --shared-ffn 2048 --bytes 2 --layers 58
  moecc simulate --nodes 1 --devices 4 --experts 8 --top-k 2 --skew 1.2 --overlap-degree 4
  moecc simulate --experts 64 --top-k 8 --trace out/trace.npz        # per-layer loads from `moecc trace`
  moecc simulate --experts 64 --top-k 8 --trace out/trace.npz --placement placement.json   # `moecc plan`'s
  moecc simulate --deepep                 # the model vs DeepEP's published low-latency table
  moecc simulate --nodes 2 --devices 8 --experts 64 --top-k 8 --train   # forward + backward
times: per layer and rank-step; 'serial' is d=1 (no overlap); d* the recommended overlap degree; with
--train, d*/b* the recommended degree and backward degree (a divisor: the backward merges chunks)."""


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="predict MoE layer step time on a cluster, with and without "
                                               "all-to-all overlap, and recommend the overlap degree",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--devices", type=int, default=8, help="devices per node (default 8)")
    g.add_argument("--intra-bw", type=float, default=160.0, help="intra-node bandwidth per device, GB/s")
    g.add_argument("--intra-lat", type=float, default=10.0, help="intra-node all-to-all latency, us")
    g.add_argument("--inter-bw", type=float, default=46.8, help="inter-node bandwidth per device, GB/s "
                   "(default: fitted to DeepEP's H800 CX7 table)")
    g.add_argument("--inter-lat", type=float, default=36.9, help="inter-node all-to-all latency, us")
    g.add_argument("--tflops", type=float, default=400.0, help="sustained GEMM throughput per device, TFLOP/s")
    g.add_argument("--chunk-overhead", type=float, default=10.0, help="fixed cost per experts chunk, us")
    g = p.add_argument_group("layer")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per device per step")
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--ffn", type=int, default=1408, help="expert FFN width")
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--top-k", type=int, default=6)
    g.add_argument("--gated", action="store_true", help="gated activation (w_in has 2F rows)")
    g.add_argument("--shared-ffn", type=int, default=0, help="shared expert width (0 = none)")
    g.add_argument("--bytes", type=float, default=2.0, help="bytes per element on the wire (default 2: bf16)")
    g.add_argument("--layers", type=int, default=1, help="MoE layers in the model (ignored with --trace)")
    g = p.add_argument_group("routing")
    g.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity (0 = balanced)")
    g.add_argument("--trace", help="per-layer expert loads from a `moecc trace` file (.npz/.json)")
    g.add_argument("--placement", help="placement.json from `moecc plan` (default: contiguous experts); the "
                   "table then also gives the contiguous placement's times on the same routing")
    g.add_argument("--accounting", default="moecc", choices=["moecc", "choice"],
                   help="moecc: this runtime's messages (a hidden row per token and destination rank, "
                        "weights and ids, split sizes per chunk) on routing sampled from --skew or "
                        "the trace; choice: a row per (token, choice), expected loads (DeepEP LL)")
    p.add_argument("--overlap-degree", type=int, help="also report this degree (1..8)")
    p.add_argument("--train", action="store_true",
                   help="also predict the training step (forward + backward: expert backward 2x the forward's "
                        "GEMMs) and recommend the degree and the backward's degree together")
    p.add_argument("--deepep", action="store_true", help="print the model's check against DeepEP's table")
    p.set_defaults(func=run)
    return p


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def run(a) -> int:
    from .distributed.costmodel import MAX_DEGREE, Cluster, LayerShape, Link
    from .simulate import simulate
    from .table import text_table
    if a.deepep:
        print(deepep_table())
        return 0
    if a.overlap_degree is not None and not 1 <= a.overlap_degree <= MAX_DEGREE:
        raise MoeccError(f"--overlap-degree must be in 1..{MAX_DEGREE}, got {a.overlap_degree}")
    cluster = Cluster(a.nodes, a.devices, Link(a.intra_lat * 1e-6, a.intra_bw * 1e9),
                      Link(a.inter_lat * 1e-6, a.inter_bw * 1e9), a.tflops * 1e12, a.chunk_overhead * 1e-6)
    layer = LayerShape(a.tokens, a.hidden, a.ffn, a.experts, a.top_k, a.gated, a.shared_ffn, a.bytes, a.bytes)
    preds = simulate(layer, cluster, a.skew, a.trace, a.layers, a.overlap_degree, a.accounting, a.train,
                     a.placement)
    head = ["layer", "dispatch ms", "experts ms", "shared ms", "combine ms", "serial ms", "d*", "overlap ms",
            "speedup", "hidden"]
    if a.overlap_degree:
        head += [f"d={a.overlap_degree} ms", f"d={a.overlap_degree} hidden"]
    if a.train:
        head += ["train serial ms", "d*/b*" if not a.overlap_degree else f"d={a.overlap_degree}/b*",
                 "train ms", "train speedup", "backward hidden"]
    rows = []
    for p in preds:
        c = p.costs
        r = [p.name, _ms(c.dispatch), _ms(c.experts), _ms(c.shared), _ms(c.combine), _ms(p.serial),
             p.best.degree, _ms(p.best.step), f"{p.serial / p.best.step:.2f}x", f"{p.best.overlap:.0%}"]
        if p.forced:
            r += [_ms(p.forced.step), f"{p.forced.overlap:.0%}"]
        if p.train:
            f, b = p.train
            r += [_ms(p.train_serial), f"{f.degree}/{b.degree}", _ms(f.step + b.step),
                  f"{p.train_serial / (f.step + b.step):.2f}x", f"{b.overlap:.0%}"]
        rows.append(r)
    serial, best = sum(p.serial for p in preds), sum(p.best.step for p in preds)
    total = ["model", "", "", "", "", _ms(serial), "", _ms(best), f"{serial / best:.2f}x", ""]
    if a.overlap_degree:
        total += [_ms(sum(p.forced.step for p in preds)), ""]
    if a.train:
        ts, tt = sum(p.train_serial for p in preds), sum(p.train[0].step + p.train[1].step for p in preds)
        total += [_ms(ts), "", _ms(tt), f"{ts / tt:.2f}x", ""]
    if len(preds) > 1:
        rows.append(total)
    print(f"cluster {a.nodes}x{a.devices} (EP{cluster.world}), {a.tokens} tokens/device, H={a.hidden}, "
          f"F={a.ffn}, E={a.experts}, top-{a.top_k}, " + (f"trace {a.trace}" if a.trace else f"skew {a.skew}"))
    print(text_table(head, rows))
    if a.placement:
        print(placement_table(preds, simulate(layer, cluster, a.skew, a.trace, a.layers, None, a.accounting)))
    return 0


def placement_table(planned: list, contiguous: list) -> str:
    """The placement's gain: contiguous experts against the plan, layer by layer, on the same routing."""
    from .table import text_table
    rows = [[p.name, _ms(c.serial), _ms(c.best.step), f"{c.best.overlap:.0%}", _ms(p.best.step),
             f"{p.best.overlap:.0%}", f"{c.best.step / p.best.step:.2f}x"] for p, c in zip(planned, contiguous)]
    if len(planned) > 1:
        cs, ps = sum(c.best.step for c in contiguous), sum(p.best.step for p in planned)
        rows.append(["model", _ms(sum(c.serial for c in contiguous)), _ms(cs), "", _ms(ps), "", f"{cs / ps:.2f}x"])
    return "\n" + text_table(["layer", "contiguous serial ms", "contiguous d* ms", "contiguous hidden",
                               "placement d* ms", "placement hidden", "placement gain"], rows)


def deepep_table(table_name: str = "2025-06") -> str:
    from .simulate import deepep_check
    from .table import text_table
    rows = [[r["ep"], r["dispatch_us"], f"{r['dispatch_pred_us']:.1f}", f"{r['dispatch_err']:+.1%}",
             r["combine_us"], f"{r['combine_pred_us']:.1f}", f"{r['combine_err']:+.1%}",
             "calibration" if r["calibrated"] else "prediction"] for r in deepep_check(table_name)]
    return (f"DeepEP README low-latency table ({table_name}; H800, 128 tokens, hidden 7168, top-8, "
            "FP8 dispatch / BF16 combine)\n"
            + text_table(["EP", "dispatch us", "model", "err", "combine us", "model", "err", "row"], rows))
