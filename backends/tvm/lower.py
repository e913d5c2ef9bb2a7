"""TVM backend: an exported MoE program → Relax → one compiled library, weights beside it.

    ExportedProgram  ⇒  moecc.decompose: each moe node ⇒ routing (ATen ops traced from moecc.routing)
                                          + one experts node (+ the shared expert, ATen ops)
                     ⇒  from_exported_program(custom_convert_map={"experts.default": experts lowering})
                     ⇒  tvm.compile(mod, target)  ⇒  DIR/model.so + DIR/params.npz + DIR/tvm_meta.json

Run-time kernel choice (dispatch.py): with no token count planned and no kernel forced, where the
cheapest kernel changes with the token count (backends/buckets.py, as the ONNX If), one library per token
bucket (DIR/model.below<T>.so ..., the open last bucket DIR/model.so), all on the same params.npz; the
runtime runs the library of the call's bucket; the manifest names each layer's kernel per bucket
("tvm.by_tokens:tvm.gather@16:tvm.grouped_gemm"). Tuning (tune.py) tunes each bucket's GEMMs at a token
count inside the bucket.

Everything but the experts goes through TVM's own PyTorch importer, routing included (this backend
defines no router: aten.py only adds generic ATen translations TVM 0.27 lacks or gets wrong).
Each `moecc::experts` node is lowered here to the kernel chosen by cost for the layer (kernels.py);
every Linear (router, shared expert, dense layers) runs on the experts' GEMM kernel (linear.py).
Token dims stay symbolic (torch.export Dim → tirx.Var), so one module serves any batch × sequence;
token-count dependent capacities stay symbolic expressions of them.

The program is imported as exported when TVM's importer knows every op (fast); otherwise it is
decomposed to core ATen first (slow: torch re-traces it). importer.py names the node of any failed
translation, closes gaps of TVM 0.27's translations (aten.py), and makes every `take` clip, so no
token id or position (≥ the table, < 0) reads out of bounds in the artifact.

Weights: parameters stay function inputs (`keep_params_as_input`); they are saved in params.npz
under their graph names, in the order `main` takes them after the user inputs (tvm_meta.json lists
both). Buffers and constants are bound into the library. The library stays small, compile time does
not depend on weight size, and the runtime (runtime.py) loads the weights once.

Options: target ("llvm" default: generic x86-64; "host": this CPU; a JSON dict), kernel (force one
"tvm.*" kernel on every layer), kernels ({layer: kernel}), tokens (the token count the cost model
plans for; default the example's), decompose (always decompose to core ATen first), tune_trials
(measure at most N schedule candidates of the expert GEMMs, tune.py; the database goes into
DIR/tvm_tuning.json and moecc's cache; None: default schedules), tune_cache (False: ignore the cache).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

log = logging.getLogger("moecc.backends.tvm")

from moecc.complex_real import complex_to_real
from moecc.decompose import decompose
from moecc.errors import MoeccError
from moecc.ops import EXPERTS_ARGS
from moecc.spec import MoESpec

from ..base import Lowered
from . import dispatch, importer, kernels, linear, tir, tune
from . import library as library_file
from .importer import message
from .kernels import dims
from .runtime import FORMAT, META, sha256

EXPERTS_KEY = "experts.default"    # TVM keys its convert map by the target's __name__ (no namespace)
LIBRARY, PARAMS = "model.so", "params.npz"


def lower(program: torch.export.ExportedProgram, out_dir: Path, options: dict) -> Lowered:
    out_dir = Path(out_dir)
    if not isinstance(program, torch.export.ExportedProgram):
        raise MoeccError(f"TVM backend: expected a torch.export.ExportedProgram, got {type(program).__name__}")
    target = resolve_target(options.get("target") or "llvm")
    t0 = time.perf_counter()
    program = complex_to_real(decompose(program))      # moe nodes ⇒ routing (ATen) + experts; no complex
    mutated = mutating(program)
    if mutated:
        log.info("TVM: %d in-place op(s) (first: %s, %s) write through views: the program is functionalized "
                 "first (TVM's importer would drop the write)", len(mutated), mutated[0].name, mutated[0].target)
    if options.get("decompose") or unsupported(program) or mutated:   # the importer takes most ATen ops
        program = program.run_decompositions()                  # as they are; decomposing (slow) is the
        check_supported(program)                                # fallback for the ones it lacks
    t_decompose = time.perf_counter() - t0
    segs = dispatch.segments(program, options)           # token buckets, one library each ([]: one)
    runs = [(None, None)] if not segs else segs
    trials = options.get("tune_trials")
    per_segment, tuners, libraries, mod, t_import, t_compile = [], [], [], None, 0.0, 0.0
    for lo, below in runs:
        seg = dict(options) if lo is None else dict(options, tokens=lo)
        if trials is not None and lo is not None:
            seg["tune_trials"] = trials // len(runs)
        tuner = tuner_for(program, seg, target, None if lo is None else dispatch.tune_tokens(lo, below))
        library = dispatch.library_name(below, LIBRARY)
        mod, choices, ti, tc = build(program, seg, target, tuner, out_dir / library)
        per_segment.append(choices)
        tuners += [tuner] if tuner is not None else []
        libraries.append({"below": below, "library": library, "kernels": {c.layer: c.kernel for c in choices}})
        t_import, t_compile = t_import + ti, t_compile + tc
    names, params = parameters(program, mod)
    np.savez(out_dir / PARAMS, **dict(zip(names, params)))
    inputs = [var_info(v) for v in mod["main"].params[:num_inputs(mod)]]
    tokens = dispatch.token_dims(program, mod, inputs) if segs else None
    if segs and tokens is None:                         # T is no product of input dims: the last library
        log.info("TVM: the experts' token count is not a product of input dims; one library, no dispatch")
        for entry in libraries[:-1]:
            (out_dir / entry["library"]).unlink()
        segs, per_segment, libraries = [], per_segment[-1:], libraries[-1:]
    files = [e["library"] for e in libraries] + [PARAMS, META]
    if tuners:
        tune.save_all(tuners, out_dir / tune.DATABASE)
        files.append(tune.DATABASE)
    meta = {
        "format": FORMAT, "tvm": tvm.__version__, "target": str(target), "device": device_of(target),
        "library": LIBRARY, "params": PARAMS, "inputs": inputs,
        "param_names": names, "param_dtypes": [str(a.dtype) for a in params],
        "sha256": {f: sha256(out_dir / f) for f in [e["library"] for e in libraries] + [PARAMS]},
    }
    if segs:
        meta["dispatch"] = {"tokens": tokens, "libraries": libraries}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    notes = {"target": str(target), "tvm": tvm.__version__, "import_s": round(t_import + t_decompose, 3),
             "compile_s": round(t_compile, 3), "weights": f"{PARAMS} (main's inputs after the user inputs)"}
    if segs:
        notes["dispatch"] = {"tokens": tokens, "libraries": libraries}
    if tuners:
        notes["tuning"] = {"database": tune.DATABASE, "trials": sum(t.measured for t in tuners),
                           "reused": sum(t.reused for t in tuners),
                           "workloads": sum(len(t.records) for t in tuners), "rows": [t.rows for t in tuners]}
    kernels_chosen = dispatch.layer_choices(per_segment, segs) if segs else per_segment[0]
    return Lowered(files=files, kernels=kernels_chosen, notes=notes)


def build(program, options: dict, target, tuner, library: Path):
    """Import (experts lowered by kernels.py, tuned knobs if any), compile, export one library."""
    from tvm.relax.frontend.torch import from_exported_program
    choices: list = []
    convert = experts_converter(options, choices, tir.lanes_of(target), tuner)
    t0 = time.perf_counter()
    try:
        mod = from_exported_program(program, keep_params_as_input=True, run_ep_decomposition=False,
                                    custom_convert_map=importer.guarded({EXPERTS_KEY: convert}))
    except MoeccError:
        raise
    except Exception as e:
        raise MoeccError(f"TVM backend: TVM {tvm.__version__}'s PyTorch importer failed: "
                         f"{type(e).__name__}: {message(e)}") from e
    mod = importer.bounded_takes(mod)                   # no gather reads out of bounds (issue 18)
    mod = linear.dense_linears(mod, tir.lanes_of(target))   # x @ W.T on the GEMM kernel, not TVM's loops
    t1 = time.perf_counter()
    log.info("tvm.compile for target %s", target.kind.name)
    with interrupts_noted():           # Ctrl-C during TVM's C++ work is an interrupt, not a TVM failure
        try:
            with target:
                executable = tvm.compile(mod, target)
        except Exception as e:
            raise MoeccError(f"TVM backend: tvm.compile for target {target.kind.name} failed: "
                             f"{type(e).__name__}: {message(e)}") from e
        t2 = time.perf_counter()
        library_file.export(executable, Path(library))      # a failed write is an error, not an exit
    return mod, choices, t1 - t0, t2 - t1


def tuner_for(program, options: dict, target, tune_tokens: int | None = None):
    """A Tuner when options["tune_trials"] asks for one (tune.py), else None: default schedules."""
    trials = options.get("tune_trials")
    if trials is None:
        log.info("TVM: expert GEMMs on their default schedules (no tuning; --tune-trials N tunes them)")
        return None
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise MoeccError(f"--tune-trials must be a whole number >= 0, got {trials!r}")
    layers = [n for n in program.graph.nodes if n.op == "call_function"
              and getattr(n.target, "__name__", "") == EXPERTS_KEY]
    tokens = int(tune_tokens or options.get("tokens") or max([example_tokens(n) for n in layers] or [1]))
    slots = max([len_slots(n) for n in layers] or [1])
    log.info("TVM: tuning the expert GEMMs of %d layer(s), at most %d trials, for %d rows (%d tokens)",
             len(layers), trials, tokens * slots, tokens)
    shapes = {tuple(tuple(a.meta["val"].shape) for a in n.args[3:5] if hasattr(a, "meta") and "val" in a.meta)
              for n in layers}                          # layers of equal weight shapes share their GEMMs
    return tune.Tuner(target, trials, tokens * slots, 2 * max(1, len(shapes)),
                      cache=options.get("tune_cache", True))


def len_slots(node) -> int:
    """S of the experts node's ids [T, S] (routing slots per token)."""
    val = node.args[1].meta.get("val") if len(node.args) > 1 and hasattr(node.args[1], "meta") else None
    return int(val.shape[-1]) if val is not None and isinstance(val.shape[-1], int) else 1


class interrupts_noted:
    """SIGINT inside TVM's C++ code (or in the compiler it spawns) is not a KeyboardInterrupt: TVM runs
    on, or fails with its own error once its child dies. Note the signal, let TVM return, and raise
    KeyboardInterrupt then, whatever TVM made of it (main thread only; elsewhere a no-op)."""

    def __enter__(self):
        self.hit, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, *_):
        self.hit = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit:
            raise KeyboardInterrupt from None
        return False


# ---------------------------------------------------------------- the experts op


def experts_converter(options: dict, choices: list, lanes: int, tuner=None):
    """fn(node, importer) -> relax var, for the importer's custom_convert_map."""
    forced = options.get("kernel") or None
    if forced and not str(forced).startswith("tvm."):
        raise MoeccError(f"TVM backend: kernel {forced!r} is not a TVM kernel; one of {', '.join(kernels.KERNELS)}")

    def convert(node, imp):
        a = op_args(node)
        spec = MoESpec.from_json(a["spec"])
        spec = spec if spec.name else spec.replace(name=node.name)
        env = {k: (None if a[k] is None else imp.env[a[k]]) for k in EXPERTS_ARGS[:-2]}
        tokens = int(options.get("tokens") or example_tokens(node))
        choice = kernels.select(spec, {"tokens": tokens, "dtype": str(env["x"].ty.dtype)},
                                (options.get("kernels") or {}).get(spec.name, forced))
        choices.append(choice)
        return emit_experts(imp.block_builder, env, spec, choice.kernel, lanes, tuner)
    return convert


def emit_experts(bb: relax.BlockBuilder, t: dict, spec: MoESpec, kernel: str, lanes: int = 4, tuner=None):
    """experts(x [T, H], ids [T, S], weights [T, S], w_in, w_out, b_in?, b_out?) -> y [T, H]."""
    return kernels.KERNELS[kernel].emit(bb, t["x"], t["weights"], t["ids"], t, spec, lanes, tuner)


def op_args(node) -> dict:
    args = dict(zip(EXPERTS_ARGS, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in EXPERTS_ARGS})
    return {k: args.get(k) for k in EXPERTS_ARGS}


def example_tokens(node) -> int:
    """The example's token count at this node (size hints of the symbolic dims), for kernel choice."""
    val = node.args[0].meta.get("val")
    if val is None:
        return 1
    sizes = [d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in val.shape[:-1]]
    return int(math.prod(s for s in sizes if s is not None)) or 1


# ---------------------------------------------------------------- checks and files


def unsupported(program: torch.export.ExportedProgram) -> list:
    """The call nodes whose op TVM's PyTorch importer has no translation for."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
    known = set(ExportedProgramImporter().convert_map) | set(importer.EXTRA) | {EXPERTS_KEY}
    return [n for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", str(n.target)) not in known]


def mutating(program: torch.export.ExportedProgram) -> list:
    """The call nodes that write into an input (`y[:, i] = v` is copy_ into a view of y: TVM's importer
    binds the result to the view alone, and y keeps its old values)."""
    return [n for n in program.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]


def check_supported(program: torch.export.ExportedProgram) -> None:
    """Name the first op (and node) TVM's importer cannot translate, before it asserts."""
    for node in unsupported(program)[:1]:
        where = node.meta.get("stack_trace", "").strip().splitlines()[-1:] or ["?"]
        hint = ("it is a moecc op without a TVM lowering yet" if "moecc" in str(node.target)
                else "rewrite the model around it or compile with --to onnx / --to torch")
        raise MoeccError(f"TVM backend: node {node.name!r} calls {node.target}, which TVM "
                         f"{tvm.__version__}'s PyTorch importer does not support ({hint}; "
                         f"source: {where[0].strip()})")


def resolve_target(spec) -> tvm.target.Target:
    """'llvm' (generic x86-64: runs on any x86-64 CPU), 'host' (llvm for this machine's CPU: AVX2 /
    AVX-512 where present, ~2x faster GEMMs, not portable to older CPUs), a JSON dict string or a dict
    -> Target, if this TVM build and machine can run it."""
    if spec == "host":
        import os
        spec = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    text = spec if isinstance(spec, str) else json.dumps(spec)
    try:
        target = tvm.target.Target(json.loads(text) if text.strip().startswith("{") else text)
    except Exception as e:
        raise MoeccError(f"TVM target {text!r} is not a valid target: {message(e)}") from None
    kind = target.kind.name
    if not tvm.runtime.enabled(kind):
        raise MoeccError(f"TVM target {kind} is not available: this TVM build has no {kind} code generator")
    if kind != "llvm":
        if not tvm.device(kind).exist:
            raise MoeccError(f"TVM target {kind} is not available on this machine: no {kind} device "
                             f"found; use --target llvm")
        raise MoeccError(f"TVM target {kind}: moecc's TVM MoE kernels have CPU schedules only; "
                         f"use --target llvm")
    return target


def device_of(target: tvm.target.Target) -> str:
    return "cpu" if target.kind.name == "llvm" else target.kind.name


def num_inputs(mod) -> int:
    return int(mod["main"].attrs["num_input"])


def parameters(program: torch.export.ExportedProgram, mod) -> tuple[list[str], list[np.ndarray]]:
    """main's parameters after the user inputs, by graph name -> numpy (what the runtime feeds back)."""
    by_arg = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
    state = {**program.state_dict, **program.constants}
    names, arrays = [], []
    for var in mod["main"].params[num_inputs(mod):]:
        tensor = state[by_arg[var.name]].detach().cpu().contiguous()
        names.append(var.name)
        if tensor.dtype == torch.bfloat16:                    # numpy has no bfloat16: ml_dtypes' (TVM's)
            import ml_dtypes
            arrays.append(tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        else:
            arrays.append(tensor.numpy())
    return names, arrays


def var_info(var) -> dict:
    return {"name": var.name, "dtype": str(var.ty.dtype),
            "shape": [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in dims(var)]}


