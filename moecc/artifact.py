"""Artifact directories: written atomically (temp dir, then rename), with manifest.json and report.md.

    DIR/manifest.json   moecc version, source, inputs/outputs, per-layer MoESpec, passes + stats,
                        backend + kernel per layer, verification (max abs / rel error, two input sets)
    DIR/<model files>   model.pt2 | model.onnx | model.so + params, plans
    DIR/report.md       the same for people
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from .errors import MoeccError

MANIFEST = "manifest.json"


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MoeccError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise MoeccError(f"{out} exists and is not a moecc artifact; refusing to replace it even with --force")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool):
    """Yield a temp dir beside `out`; on success it replaces `out`, on any error nothing is left."""
    out = Path(out)
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_manifest(artifact: Path) -> dict:
    path = Path(artifact) / MANIFEST
    if not path.exists():
        raise MoeccError(f"{artifact} is not a moecc artifact (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoeccError(f"{path} is corrupted: {e}") from None


def report_md(m: dict) -> str:
    lines = [f"# moecc artifact: {m['source']}", "",
             f"moecc {m['moecc_version']} · backend **{m['backend']['name']}** · created {m['created']}", "",
             "## MoE layers", "", "| layer | E | k | H | F | activation | router | kernel |",
             "|---|---|---|---|---|---|---|---|"]
    kernels = {k["layer"]: k["kernel"] for k in m["backend"]["kernels"]}
    for layer in m["layers"]:
        r = layer["router"]
        lines.append(f"| {layer['name']} | {layer['num_experts']} | {r['top_k']} | {layer['hidden']} | "
                     f"{layer['ffn']} | {layer['activation']} | {r['kind']} | {kernels.get(layer['name'], '-')} |")
    lines += ["", "## Passes", "", "| pass | stats | seconds |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['stats']} | {p['seconds']} |" for p in m["passes"]]
    v = m["verification"]
    lines += ["", "## Verification", ""]
    if v.get("skipped"):
        lines.append("Skipped (--no-verify).")
    else:
        lines += [f"tolerance {v['tolerance']} (abs, scaled by max(1, max|ref|))", "",
                  "| inputs | shapes | max abs | max rel | ok |", "|---|---|---|---|---|"]
        lines += [f"| {c['label']} | {c['shapes']} | {c['max_abs']:.2e} | {c['max_rel']:.2e} | {c['ok']} |"
                  for c in v["checks"]]
        if v.get("fallback"):
            lines += ["", f"Fallback: {v['fallback']}"]
    return "\n".join(lines) + "\n"
