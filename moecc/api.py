"""The public API: capture → transform → compile (lower + verify + artifact), and load.

    moecc.compile(model, example_inputs, passes=[("upcycle", {"num_experts": 8, "top_k": 2})],
                  backend="onnx", out="out/tiny_gpt_moe")
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from . import __version__, artifact, input_bounds
from .frontend import Captured, capture, export
from .errors import MoeccError
from .inputs import dim_names, fresh_inputs
from .perturb import perturb_experts, routing_blind
from .pipeline import PassManager, layer_nodes
from .progress import Steps
from .quality import quality
from .verify import summary, verify

DEFAULT_TOLERANCE = 1e-4
log = logging.getLogger("moecc.compile")


def transform(captured: Captured, passes: list[tuple[str, dict]]) -> PassManager:
    """Run named passes (canonicalize first) on the captured graph, in place; returns the manager
    (its `.records` hold each pass's stats and time)."""
    from . import passes as registry
    names = [n for n, _ in passes]
    plan = ([] if "canonicalize" in names else [("canonicalize", {})]) + list(passes)
    pm = PassManager([(n, registry.make(n, dict(o, captured=captured))) for n, o in plan])
    captured.gm = pm(captured.gm)
    return pm


def _numpy(args) -> list[np.ndarray]:
    return [t.detach().numpy() for t in args if isinstance(t, torch.Tensor)]


def _torch_runner(module: torch.nn.Module):
    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.detach().numpy() for t in tree_leaves(module(*[torch.from_numpy(a) for a in inputs]))]
    return run


def _lower_and_verify(captured, program, backend: str, options: dict, tmp: Path, verify_on: bool,
                      tol: float, steps: Steps) -> tuple[dict, dict]:
    from . import backends
    lowered = backends.get(backend).lower(program, tmp, options)
    if not verify_on:
        return lowered.to_dict(), {"skipped": True}
    steps.next("verify")
    sets = _input_sets(captured)
    run = backends.runtime(backend).load(tmp, {"backend": {"name": backend}})
    checks = verify(run, _torch_runner(captured.gm), sets, tol)
    if routing_blind(captured.gm):
        log.info("identical experts or a zero router: also verifying a twin with perturbed experts")
        checks.append(_verify_perturbed(captured, backend, options, tmp, sets[-1][1], tol))
    return lowered.to_dict(), {"tolerance": tol, "checks": [c.to_dict() for c in checks],
                               "ok": all(c.ok for c in checks), "text": summary(checks)}


def _verify_perturbed(captured, backend: str, options: dict, tmp: Path, inputs, tol: float):
    """The graph's outputs cannot depend on routing (identical experts or a zero router): lower a twin
    whose experts differ and whose router decides (moecc.perturb) and check it too, so a backend that
    routes or combines wrongly cannot pass. The twin's files go to a scratch dir, then away."""
    import shutil
    import tempfile

    from . import backends
    twin = perturb_experts(captured.gm)
    program = export(twin, captured.example_inputs, captured.dynamic_shapes, captured.source)
    scratch = Path(tempfile.mkdtemp(prefix=".perturbed.", dir=tmp.parent))
    try:
        backends.get(backend).lower(program, scratch, dict(options))
        run = backends.runtime(backend).load(scratch, {"backend": {"name": backend}})
        (check,) = verify(run, _torch_runner(twin), [("perturbed", inputs)], tol)
        return check
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _input_sets(captured) -> list[tuple[str, list[np.ndarray]]]:
    """The example inputs, and fresh ones of another token count (verification and quality use both)."""
    return [("example", _numpy(captured.example_inputs)),
            ("fresh", _numpy(fresh_inputs(captured.example_inputs, captured.inputs)))]


def compile(model: torch.nn.Module, example_inputs, *, passes: list[tuple[str, dict]] = (),
            backend: str = "torch", out: str | Path, options: dict | None = None, verify: bool = True,
            force: bool = False, tolerance: float = DEFAULT_TOLERANCE, source: str = "model",
            progress: bool = True) -> Path:
    """Capture, transform, lower and verify `model`; write the artifact directory `out` atomically."""
    from . import passes as registry
    passes = registry.check(passes)       # names and options, before the model is captured
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise MoeccError(f"tolerance must be a number > 0, got {tolerance!r}")
    options = dict(options or {})
    out = Path(out)
    artifact.check_out_dir(out, force)
    steps = Steps(["capture", "passes", "lower", "verify", "write"], enabled=progress)
    try:
        return _compile(model, example_inputs, passes, backend, out, options, verify, force, tolerance,
                        source, steps)
    finally:
        steps.close()


def _compile(model, example_inputs, passes, backend, out, options, verify, force, tolerance, source, steps):
    captured = capture(model, example_inputs, source=source)
    steps.next("passes")
    sets = _input_sets(captured) if passes else []
    before = {label: _torch_runner(captured.gm)(inputs) for label, inputs in sets}    # the model before passes
    pm = transform(captured, list(passes))
    moved = quality(before, _torch_runner(captured.gm), sets) if sets else None
    steps.next("lower")
    program = captured.export()
    with artifact.atomic_dir(out, force) as tmp:
        lowered, check = _lower_and_verify(captured, program, backend, options, tmp, verify, tolerance, steps)
        if check.get("ok") is False and backend == "onnx" and options.get("onnx_moe", "auto") != "portable":
            first = check["text"]
            for f in tmp.iterdir():
                f.unlink()
            options["onnx_moe"] = "portable"
            lowered, check = _lower_and_verify(captured, captured.export(), backend, options, tmp, True,
                                               tolerance, steps)
            check["fallback"] = (f"the fused ONNX Runtime MoE op did not match the PyTorch reference "
                                 f"({first}); fell back to the portable lowering")
            log.warning("%s", check["fallback"])
        if check.get("ok") is False:
            raise MoeccError(f"{source}: {backend} output differs from the PyTorch reference beyond "
                             f"tolerance {tolerance}: {check['text']}; nothing written (--no-verify to skip)")
        for k in lowered.get("kernels", []):
            log.info("layer %s: kernel %s (%s)", k.get("layer"), k.get("kernel"), k.get("reason", ""))
        log.info("verification: %s", check.get("text", "skipped"))
        steps.next("write")
        manifest = {
            "moecc_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "inputs": input_bounds.find(captured.gm, captured.inputs),
            "outputs": _outputs(program),
            "layers": [dict(spec.to_dict(), node=node.name, **_facts(node)) for node, spec in layer_nodes(captured.gm)],
            "passes": [r.to_dict() for r in pm.records],
            "backend": dict(name=backend, options={k: v for k, v in options.items() if _jsonable(v)}, **lowered),
            "verification": check,
            **({"quality": moved} if moved else {}),
            "recognized": captured.recognized,
        }
        ep = captured.gm.meta.get("moecc.ep")            # the expert_parallel pass's plan
        if ep is not None:
            artifact.write_json(tmp / "ep.json", ep)
            manifest["expert_parallel"] = {"world": ep["world"], "method": ep["method"],
                                           "plan": "ep.json"}
        schedule = captured.gm.meta.get("moecc.overlap")  # the overlap pass's schedule (JSON text)
        if schedule is not None:
            (tmp / "schedule.json").write_text(schedule)
            manifest["overlap"] = {"schedule": "schedule.json"}
        if "moecc.heal" in captured.gm.meta:          # moefy --heal: steps, loss curve, held-out metric
            manifest["heal"] = captured.gm.meta["moecc.heal"]
        (tmp / "report.md").write_text(artifact.report_md(manifest))
        manifest[artifact.FILES] = artifact.file_hashes(tmp)
        artifact.write_json(tmp / artifact.MANIFEST, manifest)
    return out


def _facts(node) -> dict:
    """Extra per-layer facts a pass left in node.meta (e.g. moefy's partition and calibration)."""
    return {k.split(".", 1)[1]: v for k, v in node.meta.items() if k.startswith("moecc.") and k != "moecc.spec"}


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _outputs(program: torch.export.ExportedProgram) -> list[dict]:
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    names = dim_names(program)
    outs = []
    for i, val in enumerate(tree_leaves([a.meta.get("val") if hasattr(a, "meta") else None
                                         for a in tree_leaves(out_node.args)])):
        if isinstance(val, torch.Tensor):
            outs.append({"index": i, "dtype": str(val.dtype).replace("torch.", ""),
                         "shape": [d if isinstance(d, int) else names.get(str(d), str(d)) for d in val.shape]})
    return outs


def load(path: str | Path):
    """Load an artifact: a torch artifact gives its ExportedProgram; others a `run(list[np]) -> list[np]`."""
    from . import backends
    manifest = artifact.read_manifest(Path(path))
    name = manifest["backend"]["name"]
    if name == "torch":
        return backends.runtime("torch").load_program(path)
    return backends.runtime(name).load(path, manifest)
