"""The `moecc` command line: compile, inspect, run (+ bench, plan, trace, simulate from their own modules).

Every user mistake ends as one line `moecc: error: ...` and exit code 2; nothing half-written.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import MoeccError

COMPILE_EXAMPLES = """examples:
  moecc compile samples/tiny_gpt.py:build --upcycle 8 --top-k 2 --to onnx --out out/tiny_gpt_moe
  moecc compile samples/tiny_bert.py:build --upcycle 4 --top-k 1 --layers every-2 --to torch --out out/bert
  moecc compile samples/minilm.py:build --moefy 8 --top-k 2 --calibration corpus:calibration --to onnx --out out/minilm
  moecc compile samples/tiny_gpt.py:build --upcycle 8 --router sigmoid-topk --capacity-factor 1.25 --out out/g
"""

EXTRA_COMMANDS = [("moecc.cli_bench", "add_bench_parser"), ("moecc.cli_plan", "add_plan_parser"),
                  ("moecc.cli_plan", "add_trace_parser"), ("moecc.cli_simulate", "add_simulate_parser")]


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="capture, transform, lower and verify a model into an artifact",
                       description="Compile MODEL (path/to/file.py:factory or package.module:factory; the "
                                   "factory returns (model, example_inputs)) into an artifact directory.",
                       epilog=COMPILE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    g = p.add_argument_group("dense → MoE")
    g.add_argument("--upcycle", type=int, metavar="E", help="sparse upcycling: each FFN → E copies")
    g.add_argument("--moefy", type=int, metavar="E", help="MoEfication: split each FFN into E experts")
    g.add_argument("--top-k", type=int, help="experts per token (default 2 for --upcycle/--moefy; "
                                              "with --router: the layer's own k unless given)")
    g.add_argument("--layers", default="all", help="FFNs to rewrite: all | every-N | 0,2,5 (default all)")
    g.add_argument("--router-init", default="zeros", choices=["zeros", "random"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calibration", help="moefy: text file (one example per line) or tensor file")
    g.add_argument("--method", default="cluster", help="moefy partition: cluster | coactivation")
    g.add_argument("--shared", type=int, default=0, help="moefy: neurons kept in an always-on shared expert")
    g.add_argument("--moefy-router", default="linear", choices=["linear", "mlp"],
                   help="moefy: router model fitted on the calibration data (default linear: ridge)")
    g.add_argument("--no-refit", dest="refit", action="store_false",
                   help="moefy: keep the dense output weights (fit only expert biases) instead of "
                        "refitting them to the router's choices by least squares")
    g.add_argument("--heal", type=int, default=0, metavar="STEPS",
                   help="moefy: after the split, train the MoEfied model to match the dense one for up to "
                        "STEPS steps on the calibration data (held-out part picks the step; default 0: off)")
    g.add_argument("--heal-params", default="all", choices=["all", "experts"],
                   help="moefy --heal: train every weight but routers and embeddings (all, default) or "
                        "the experts only")
    g = p.add_argument_group("routing")
    g.add_argument("--router", help="set the router of every MoE layer (see `moecc inspect --routers`)")
    g.add_argument("--route-layers", help="MoE layers the router applies to: all | every-N | 0,2 | names")
    g.add_argument("--capacity-factor", type=float, help="token dropping above capacity (default dropless)")
    g.add_argument("--n-groups", type=int, help="group-limited / hierarchical routing: number of groups")
    g.add_argument("--topk-groups", type=int, help="groups kept per token")
    g.add_argument("--passes", help="explicit pass list, comma separated (e.g. canonicalize,upcycle,route)")
    g = p.add_argument_group("expert parallel (torch backend; run with torchrun -m moecc.distributed.launch)")
    g.add_argument("--ep", type=int, metavar="N", help="split every experts layer over N ranks")
    g.add_argument("--placement", type=Path, help="placement.json from `moecc plan` (default: contiguous)")
    g.add_argument("--capacity-scope", default="rank", choices=["rank", "global"],
                   help="capacity / expert choice over each rank's tokens (rank) or all ranks' (global: refused)")
    g.add_argument("--overlap-degree", type=int, metavar="D",
                   help="run each experts layer in D token chunks (1..8), their all-to-alls behind compute; "
                        "written to schedule.json (default: chosen per layer at launch: --overlap-degree auto)")
    g = p.add_argument_group("backend")
    g.add_argument("--to", dest="backend", default="torch", help="torch | onnx | tvm (default torch)")
    g.add_argument("--onnx-moe", default="auto", choices=["auto", "portable", "fused"],
                   help="onnx: standard ops only, ORT's fused com.microsoft::MoE, or auto (default): the "
                        "cheapest exact kernel per token-count bucket, switched at run time by an ONNX If")
    g.add_argument("--target", default="llvm", help="tvm target (default llvm)")
    g.add_argument("--kernel", help="force one MoE kernel for every layer (e.g. torch.grouped_gemm)")
    g.add_argument("--autotune", action="store_true", help="measure kernel candidates per token bucket")
    g.add_argument("--tune-trials", type=int, metavar="N",
                   help="tvm: measure at most N schedule candidates of the expert GEMMs (database in the "
                        "artifact and the cache; default: no tuning)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="artifact directory (must not exist)")
    g.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    g.add_argument("--no-verify", action="store_true", help="skip numerical verification (recorded)")
    g.add_argument("--tolerance", type=float, default=1e-4, help="max abs error, scaled by max(1, |ref|)")
    p.set_defaults(func=cmd_compile)


def _passes_from(a) -> list[tuple[str, dict]]:
    common = {"num_experts": a.upcycle if a.upcycle is not None else a.moefy, "top_k": 2 if a.top_k is None else a.top_k, "layers": a.layers,
              "router_init": a.router_init, "seed": a.seed, "calibration": a.calibration,
              "method": a.method, "shared": a.shared, "moefy_router": a.moefy_router, "refit": a.refit,
              "heal": a.heal, "heal_params": a.heal_params}
    route = {k: v for k, v in {"router": a.router, "top_k": a.top_k, "capacity_factor": a.capacity_factor,
                               "n_groups": a.n_groups, "topk_groups": a.topk_groups,
                               "layers": a.route_layers}.items()
             if v is not None}
    ep = {"ep": a.ep, "placement": a.placement, "capacity_scope": a.capacity_scope,
          "overlap_degree": a.overlap_degree}
    from .passes import accepted_options

    def only(name: str, options: dict) -> tuple[str, dict]:       # the options this pass reads
        return name, {k: v for k, v in options.items() if k in accepted_options(name)}
    if a.passes:
        return [only(n.strip(), dict(common, **route, **ep)) for n in a.passes.split(",") if n.strip()]
    passes = []
    if a.upcycle is not None:
        passes.append(only("upcycle", common))
    if a.moefy is not None:
        passes.append(only("moefy", common))
    if a.router or a.capacity_factor is not None or a.n_groups:
        passes.append(("route", route))
    if a.ep:
        passes.append(only("expert_parallel", ep))
    if a.overlap_degree is not None:
        passes.append(only("overlap", ep))
    return passes


def cmd_compile(a) -> int:
    from . import api
    from .cli_checks import check_compile
    from .loader import load_model
    check_compile(a)                      # every flag, before the model is loaded or captured
    passes = _passes_from(a)
    model, inputs, tokenize = load_model(a.model, with_tokenizer=True)
    for _, opts in passes:
        opts.setdefault("tokenize", tokenize)
    options = {"onnx_moe": a.onnx_moe, "target": a.target, "kernel": a.kernel, "autotune": a.autotune}
    if a.tune_trials is not None:
        options["tune_trials"] = a.tune_trials
    out = api.compile(model, inputs, passes=passes, backend=a.backend, out=a.out, options=options,
                      verify=not a.no_verify, force=a.force, tolerance=a.tolerance, source=a.model)
    from .inspect_model import inspect
    print(inspect(str(out)))
    print(f"wrote {out}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="table of a model's or artifact's FFN/MoE layers",
                       epilog="examples:\n  moecc inspect samples/tiny_gpt.py:build\n  moecc inspect out/tiny_gpt_moe\n"
                              "  moecc inspect --routers", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="MODEL|ARTIFACT")
    p.add_argument("--routers", action="store_true", help="list the router kinds")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a) -> int:
    from .inspect_model import inspect, routers_help
    if a.routers:
        print(routers_help())
    if a.target:
        print(inspect(a.target))
    elif not a.routers:
        raise MoeccError("inspect needs MODEL or ARTIFACT (or --routers)")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run an artifact on inputs from an .npz file (no torch for onnx/tvm)",
                       epilog="examples:\n  moecc run out/tiny_gpt_moe --example-input tokens.npz   # writes a valid "
                              "input file\n  moecc run out/tiny_gpt_moe --input tokens.npz --output logits.npz\n"
                              "inputs, their dims (batch, seq) and token-id ranges: the artifact's manifest.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--input", type=Path, help=".npz with one array per model input (by name or order)")
    p.add_argument("--example-input", type=Path, metavar="NPZ",
                   help="write random inputs the artifact accepts (batch 2, seq 16) to NPZ and stop")
    p.add_argument("--force", action="store_true", help="replace an existing --example-input file")
    p.add_argument("--output", type=Path, help="write outputs to this .npz")
    p.set_defaults(func=cmd_run)


def cmd_run(a) -> int:
    from .run_artifact import run_artifact, write_example_input
    if a.example_input is not None:
        arrays = write_example_input(a.artifact, a.example_input, a.force)
        shapes = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in arrays.items())
        print(f"wrote {a.example_input} ({shapes}); run it: moecc run {a.artifact} --input {a.example_input}")
        return 0
    if a.input is None:
        raise MoeccError("run needs --input FILE.npz (or --example-input FILE.npz to write one)")
    outputs = run_artifact(a.artifact, a.input, a.output)
    for i, o in enumerate(outputs):
        print(f"output {i}: shape {list(o.shape)} dtype {o.dtype} mean {float(o.mean()):.6g}")
    return 0


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="log moecc's choices (-v: kernels, fallbacks; -vv: details)")
    p.add_argument("-q", "--quiet", action="store_true", default=default if default is not None else False,
                   help="errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecc", description="A compiler for Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=f"moecc {__import__('moecc').__version__}")
    _add_verbosity(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_inspect(sub)
    _add_run(sub)
    for module, fn in EXTRA_COMMANDS:
        getattr(importlib.import_module(module), fn)(sub)
    for p in sub.choices.values():               # `moecc compile ... -v` as well as `moecc -v compile`
        _add_verbosity(p, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .log import cli_logging
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with cli_logging(args.verbose or 0, bool(args.quiet)):
            return args.func(args)
    except MoeccError as e:
        print(f"moecc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moecc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                       # Ctrl-C that landed inside an import or a library is
        if not _interrupted(e):                  # wrapped (dataclasses' __set_name__ wraps it in a
            raise                                # RuntimeError): still an interrupt, not a crash
        print("moecc: interrupted", file=sys.stderr)
        return 130


def _interrupted(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
