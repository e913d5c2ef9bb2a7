"""`moecc trace` (record which experts every token chooses) and `moecc plan` (place experts on devices).

    moecc trace MODEL --calibration DATA --out trace.npz|json [--windows W]
    moecc plan --trace trace.npz --topology 4x8:slots=9 --replicas 32 --method graph --out placement.json
    moecc plan --trace trace.npz --topology 4x8:slots=9 --replicas 32 --compare [--plot load.png]

Formats and metrics: passes/placement/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MoeccError

PLAN_EXAMPLES = """examples:
  moecc plan --trace trace.npz --topology 4x8:slots=9,intra=300,inter=25 --replicas 32 --out placement.json
  moecc plan --trace trace.npz --topology 2x4:slots=10 --method eplb --replicas 16 --out eplb.json
  moecc plan --trace trace.npz --topology 4x8:slots=9 --replicas 32 --compare --plot load.png
"""
TRACE_EXAMPLES = """examples:
  moecc trace out/minilm_moe --calibration moecc/data/corpus.txt --out trace.npz
  moecc trace samples/hf_moe.py:build_olmoe --calibration tokens.pt --windows 4 --out trace.json
"""


def add_plan_parser(subparsers) -> None:
    from moecc.passes.placement import METHODS
    p = subparsers.add_parser(
        "plan", help="place experts (and replicas) on devices from a routing trace",
        description="Plan which devices hold which experts, from a trace of the experts each token "
                    "chose (see `moecc trace`). --compare evaluates every method honestly: planned on "
                    "window i of the trace, scored on window i+1.",
        epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace.npz or trace.json")
    p.add_argument("--topology", required=True,
                   help="NODESxDEVICES:slots=S[,intra=GB/s,inter=GB/s] or a topology JSON file")
    p.add_argument("--replicas", type=int, default=0, help="extra expert copies per layer (default 0)")
    p.add_argument("--method", default="graph", choices=list(METHODS), help="default graph")
    p.add_argument("--groups", type=int, default=1,
                   help="eplb: the model's expert groups (hierarchical policy if a multiple of nodes)")
    p.add_argument("--local-replicas", type=int, default=0, metavar="R",
                   help="graph: spend R of the replicas on node-local experts, a copy of the hottest "
                        "on every node so tokens choosing them stay on their node (nodes - 1 replicas "
                        "each, more for an expert too hot for one device per node; fewer cross-node "
                        "sends on clustered traces, a little less balance; default 0)")
    p.add_argument("--window", type=int, help="plan on this window only (default: all tokens)")
    p.add_argument("--model", metavar="MODEL", help="check the trace against this model's MoE layers")
    p.add_argument("--out", type=Path, help="write placement.json here")
    p.add_argument("--force", action="store_true", help="replace an existing --out / --plot file")
    p.add_argument("--compare", action="store_true", help="evaluate every method, print a table")
    p.add_argument("--plot", type=Path, help="with --compare: heatmap PNG of per-device load")
    p.add_argument("--hidden", type=int, default=4096,
                   help="hidden size for the predicted all-to-all time (bf16 tokens; default 4096)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(a) -> int:
    from moecc.passes.placement import evaluate, load_trace, parse_topology, plan, save_plan
    from moecc.passes.placement.metrics import device_loads
    from moecc.passes.placement.report import heatmap, table
    from moecc.passes.placement.trace import check_against_model
    if not (a.out or a.compare):
        raise MoeccError("plan: say --out placement.json, --compare, or both")
    if a.plot and not a.compare:
        raise MoeccError("plan: --plot needs --compare")
    _check_plan_args(a)
    trace = load_trace(a.trace)
    topology = parse_topology(a.topology)
    if a.model:
        specs = model_moe_layers(a.model)
        experts = {s.num_experts for s in specs}
        if len(experts) > 1:
            raise MoeccError(f"model {a.model} has MoE layers with different expert counts {sorted(experts)}")
        check_against_model(trace, len(specs), experts.pop())
    options = {"eplb": {"groups": a.groups}, "graph": {"local_replicas": a.local_replicas}}
    if a.out:
        source = trace if a.window is None else trace.select(a.window)
        p = plan(source, topology, a.method, a.replicas, **options.get(a.method, {}))
        save_plan(p, a.out)
        print(f"{a.method}: {trace.num_layers} layers x {trace.num_experts} experts on {topology} "
              f"with {a.replicas} replicas, planned in {p.planning_s:.3f} s; wrote {a.out}")
    if a.compare:
        in_sample = len(trace.windows()) < 2
        if in_sample:
            print("note: the trace has one window, so plans are scored on the tokens they were planned "
                  "on (record more windows: moecc trace --windows 2)", file=sys.stderr)
        methods = [m for m in ("contiguous", "round_robin", "eplb", "graph")
                   if m not in ("contiguous", "round_robin") or _fits_unreplicated(trace, topology)]
        results = evaluate(trace, topology, methods, a.replicas, token_bytes=2 * a.hidden,
                           options=options, in_sample=in_sample)
        print(table(results, trace.num_layers, baseline="eplb"))
        if a.plot:
            last = trace.select(trace.windows()[-1])
            planned = trace.select(trace.windows()[-2 if len(trace.windows()) > 1 else -1])
            loads = {m: device_loads(plan(planned, topology, m, 0 if m in ("contiguous", "round_robin")
                                          else a.replicas, **options.get(m, {})), last)
                     for m in methods}
            heatmap(loads, a.plot, title=f"per-device load, {topology}, {a.replicas} replicas")
            print(f"wrote {a.plot}")
    return 0


def _check_plan_args(a) -> None:
    from moecc.cli_checks import check_out_file
    for flag, value, low in (("--hidden", a.hidden, 1), ("--replicas", a.replicas, 0), ("--groups", a.groups, 1),
                             ("--local-replicas", a.local_replicas, 0)):
        if value < low:
            raise MoeccError(f"plan: {flag} must be >= {low}, got {value}")
    if a.local_replicas and a.method != "graph" and not a.compare:
        raise MoeccError(f"plan: --local-replicas applies to --method graph only, not {a.method}; drop it "
                         "or use --method graph")
    if a.window is not None and a.window < 0:
        raise MoeccError(f"plan: --window must be >= 0, got {a.window}")
    if not a.trace.is_file():
        raise MoeccError(f"plan: --trace {a.trace}: no such file")
    if a.out:
        check_out_file(a.out, a.force, "--out")
    if a.plot:
        check_out_file(a.plot, a.force, "--plot")


def _fits_unreplicated(trace, topology) -> bool:
    return -(-trace.num_experts // topology.devices) <= topology.slots


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="record which experts every token chooses, per MoE layer, in time windows",
        description="Run MODEL (path/to/file.py:factory or package.module:factory) on calibration "
                    "data and record, per MoE layer, the k experts each token chose and their weights.",
        epilog=TRACE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory, package.module:factory, "
                                                  "or a torch artifact directory")
    p.add_argument("--calibration", required=True,
                   help="text file (one example per line; needs tokenize(lines) beside the factory) "
                        "or a .pt/.npz file of input tensors")
    p.add_argument("--windows", type=int, default=2,
                   help="split the tokens into this many consecutive windows (default 2)")
    p.add_argument("--out", required=True, type=Path, help="trace.npz or trace.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_trace)


def cmd_trace(a) -> int:
    import torch

    from moecc import calibration
    from moecc.loader import tokenizer_for
    from moecc.ops import record_routing
    from moecc.passes.placement.trace import from_records, save_trace
    from moecc.cli_checks import check_out_file
    if a.out.suffix not in (".npz", ".json"):
        raise MoeccError(f"trace: --out must end in .npz or .json, got {a.out.name}")
    if a.windows < 1:
        raise MoeccError(f"trace: --windows must be >= 1, got {a.windows}")
    check_out_file(a.out, a.force, "--out")
    if not a.calibration.startswith("corpus:") and not Path(a.calibration).is_file():
        raise MoeccError(f"trace: --calibration {a.calibration}: no such file")
    run, specs, source = _runnable(a.model)
    experts = {s.num_experts for s in specs}
    if len(experts) > 1:
        raise MoeccError(f"model {a.model} has MoE layers with different expert counts {sorted(experts)}; "
                         "a trace needs one E")
    tokenize = None
    if not a.calibration.endswith((".pt", ".npz")) and ":" in source:   # text: the tokenize(lines)
        # defined beside the factory
        tokenize = tokenizer_for(source)
    cal = calibration.load(a.calibration, tokenize)
    names = _layer_names(specs)
    records = []
    for batch in cal.batches:
        with record_routing() as seen, torch.no_grad():
            try:
                run(*batch)
            except Exception as e:
                raise MoeccError(f"trace: the model does not run on the calibration data {a.calibration} "
                                 f"({type(e).__name__}: {_first_line(e)}); give inputs the model takes") from None
        if len(seen) != len(specs):
            raise MoeccError(f"trace: a forward pass ran {len(seen)} MoE layer calls, the model has "
                             f"{len(specs)} MoE layers")
        records += [dict(r, layer=name) for r, name in zip(seen, names)]
    trace = from_records(records, experts.pop(), a.windows)
    save_trace(trace, a.out)
    print(f"{trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}, "
          f"{trace.num_tokens} tokens in {len(trace.windows())} windows; wrote {a.out}")
    return 0


def _runnable(ref: str):
    """MODEL (a factory, or a torch artifact directory from `moecc compile`) -> (graph module to
    run, [MoESpec per MoE layer in graph order], the factory reference it came from)."""
    from moecc.pipeline import layer_nodes
    source = ref
    if Path(ref).is_dir():
        from moecc import load
        from moecc.artifact import read_manifest
        manifest = read_manifest(Path(ref))
        if manifest.get("backend", {}).get("name") != "torch":
            raise MoeccError(f"trace: {ref} is a {manifest.get('backend', {}).get('name')} artifact; "
                             "trace a torch artifact or the model factory")
        gm, source = load(ref).module(), str(manifest.get("source", ""))
    else:
        from moecc.frontend import capture
        from moecc.loader import load_model
        model, inputs = load_model(ref)
        gm = capture(model, inputs, source=ref).gm
    specs = [spec for _, spec in layer_nodes(gm)]      # moe nodes, or a torch artifact's experts nodes
    if not specs:
        raise MoeccError(f"model {ref} has no MoE layer moecc recognizes (make one with "
                         "`moecc compile --upcycle E` or `--moefy E`)")
    return gm, specs, source


def model_moe_layers(ref: str) -> list:
    """The MoESpec of every MoE layer of MODEL (factory or torch artifact), in graph order."""
    return _runnable(ref)[1]


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _layer_names(specs) -> list[str]:
    names = [s.name for s in specs]
    if all(names) and len(set(names)) == len(names):
        return names
    return [f"moe{i}" + (f":{n}" if n else "") for i, n in enumerate(names)]
