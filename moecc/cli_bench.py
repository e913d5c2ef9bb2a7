"""`moecc bench`: measure the PyTorch MoE kernels against the hardware limit and the alternatives.

    add_bench_parser(subparsers)      the lead's moecc/cli.py wires it in
    python -m moecc.cli_bench [--quick] [--out DIR] [--threads N]   stand-alone

The grid runs at 1 thread and at every core (os.cpu_count()); the all-cores run is the headline.
"""
from __future__ import annotations

import argparse
import sys

from .errors import MoeccError

EPILOG = """examples:
  moecc bench --quick                    # 3 shapes x T in 1, 64, 512, 3 repeats, no TVM, at 1 thread
                                         #   and every core: ~10 min on this project's 2 cores shared
                                         #   with other jobs (5 repeats took 7 min per thread count)
  moecc bench --out bench_out            # full grid: T in 1, 8, 64, 512, 2048, 5 repeats, TVM,
                                         #   at 1 thread and at every core (17 min quiet on 2 cores, longer shared)
  moecc bench --threads 1 --clock cpu    # a machine shared with other jobs: CPU seconds, 1 thread
  moecc bench --threads 1 --shapes mixtral-like --tokens 1,8 --no-tvm
writes DIR/bench.md (table), DIR/bench.json, DIR/bench.png; the table is also printed."""


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark MoE kernels vs the hardware limit, ORT and transformers",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="T in 1, 64, 512, 3 repeats, no TVM, both thread counts (~10 min on 2 shared cores)")
    p.add_argument("--out", default="bench_out", metavar="DIR", help="output directory (default: bench_out)")
    p.add_argument("--force", action="store_true", help="replace the bench.* files of an earlier run in --out")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="one thread count only (default: 1 and every core, os.cpu_count())")
    p.add_argument("--shapes", default=None, help="comma list of shapes (mixtral-like, deepseek-like, switch-like)")
    p.add_argument("--tokens", default=None, help="comma list of token counts (default 1,8,64,512,2048)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    p.add_argument("--no-alternatives", action="store_true", help="skip onnxruntime and transformers")
    p.add_argument("--tvm", action=argparse.BooleanOptionalAction, default=None,
                   help="also compile and time moecc's TVM kernels (default: on for the full run, off for --quick)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall seconds (default) or process CPU seconds (with --threads 1 on a shared machine)")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MoeccError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise MoeccError(f"--{what} values must be >= 1, got {text!r}")
    return values


OUTPUTS = ("bench.md", "bench.json", "bench.png")


def check_args(args: argparse.Namespace) -> None:
    """Everything judged before the (minutes long) run: numbers, and an --out that can be written
    and holds no earlier results unless --force."""
    from pathlib import Path

    from moecc.cli_checks import check_writable
    if args.repeats is not None and args.repeats < 1:
        raise MoeccError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise MoeccError(f"--threads must be >= 1, got {args.threads}")
    if args.clock == "cpu" and args.threads != 1:
        raise MoeccError("--clock cpu adds up the CPU seconds of every thread, so it only times a 1-thread run: "
                         "pass --threads 1 with it, or use the wall clock")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoeccError(f"--out {out} is a file, not a directory; choose another --out")
    earlier = [n for n in OUTPUTS if (out / n).exists()]
    if earlier and not args.force:
        raise MoeccError(f"--out {out} already holds {', '.join(earlier)} from an earlier run; pass --force "
                         "to replace them or choose another --out")
    check_writable(out / OUTPUTS[0], "--out")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from moecc.bench import grid as bench, report as bench_report
    shapes = bench.SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = [s for s in wanted if s not in bench.SHAPES]
        if unknown:
            raise MoeccError(f"unknown shape(s) {unknown}; choose from {', '.join(bench.SHAPES)}")
        shapes = {s: bench.SHAPES[s] for s in wanted}
    tokens = _ints(args.tokens, "tokens") if args.tokens else (bench.QUICK["tokens"] if args.quick else bench.TOKENS)
    repeats = args.repeats or (bench.QUICK["repeats"] if args.quick else bench.FULL_REPEATS)
    results = bench.run_threads(shapes, tokens, repeats, bench.thread_counts(args.threads),
                                alternatives=not args.no_alternatives, clock=args.clock,
                                tvm=(not args.quick) if args.tvm is None else args.tvm)
    try:
        paths = bench_report.write(results, args.out)
    except OSError as e:
        raise MoeccError(f"cannot write the results to {args.out}: {e.strerror or e}") from None
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moecc bench", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except MoeccError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
