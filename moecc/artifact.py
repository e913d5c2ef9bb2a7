"""Artifact directories: written atomically (temp dir, then rename), with manifest.json and report.md.

    DIR/manifest.json   moecc version, source, inputs/outputs, per-layer MoESpec, passes + stats,
                        backend + kernel per layer, verification (max abs / rel error, two input sets)
    DIR/<model files>   model.pt2 | model.onnx | model.so + params, plans
    DIR/report.md       the same for people
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MoeccError

MANIFEST = "manifest.json"
FILES = "files"                      # manifest key: {relative path: sha256} of every other file
log = logging.getLogger("moecc.artifact")


def is_artifact(out: Path) -> bool:
    """A directory moecc wrote: a manifest that parses, with moecc's keys (not merely a file named so)."""
    try:
        m = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "moecc_version" in m and isinstance(m.get("backend"), dict)


def check_out_dir(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise MoeccError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoeccError(f"{out} is a file, not an artifact directory; refusing to replace it even with --force")
    if out.exists() and any(out.iterdir()) and not is_artifact(out):
        raise MoeccError(f"{out} exists and is not a moecc artifact; refusing to replace it even with --force")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MoeccError(f"cannot write {out}: {parent} is a file, not a directory")
            break


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _replace(tmp: Path, out: Path) -> None:
    """tmp becomes out; an existing out is swapped out atomically (never a moment with neither)."""
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):                       # tmp now holds the old artifact: removed by caller
        pass
    else:                                           # no RENAME_EXCHANGE: two renames, old kept till the end
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        old.rename(tmp)


def _mkdir_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeccError(f"cannot create the parent of {out}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool):
    """Yield a temp dir beside `out`; on success it replaces `out` (atomic swap), on any error (or
    Ctrl-C) nothing is left and an existing `out` is untouched."""
    out = Path(out)
    check_out_dir(out, force)
    _mkdir_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise MoeccError(f"cannot write beside {out}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                   # mkdtemp's 0700 would hide the artifact from others
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise MoeccError(f"cannot write {out}: {e.strerror} (nothing written)") from None
            raise
        check_out_dir(out, force)                   # still true after the work (another writer?)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` except the manifest itself."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def check_files(artifact: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its recorded sha256; else one clear line."""
    for name, digest in (manifest.get(FILES) or {}).items():
        path = Path(artifact) / name
        if not path.is_file():
            raise MoeccError(f"artifact {artifact} is incomplete: {name} is missing; recompile it")
        if sha256(path) != digest:
            raise MoeccError(f"artifact {artifact} is corrupted: {name} does not match the checksum in its "
                             f"manifest (truncated or changed after compile); recompile it")


def read_manifest(artifact: Path, check: bool = True) -> dict:
    """The artifact's manifest, its schema checked and (`check`) every file's checksum verified."""
    path = Path(artifact) / MANIFEST
    if not Path(artifact).is_dir():
        raise MoeccError(f"{artifact} is not a moecc artifact directory")
    if not path.exists():
        raise MoeccError(f"{artifact} is not a moecc artifact (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeccError(f"{path} is corrupted: {e}") from None
    except OSError as e:
        raise MoeccError(f"cannot read {path}: {e.strerror or e}") from None
    missing = [k for k in ("moecc_version", "backend", "inputs") if not isinstance(m, dict) or k not in m]
    if missing or not isinstance(m["backend"], dict) or not isinstance(m["backend"].get("name"), str) \
            or not isinstance(m["inputs"], list):
        what = f"no {missing[0]!r}" if missing else "a malformed 'backend' or 'inputs'"
        raise MoeccError(f"{path} is not a moecc manifest ({what}); recompile the artifact")
    if check:
        check_files(artifact, m)
    return m


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
    q = m.get("quality")
    if q:
        lines += ["", f"## Quality against {q['against']}", "",
                  "What the passes changed (verification above: backend vs the transformed graph).", "",
                  "| inputs | rel error | mean cosine | worst cosine |", "|---|---|---|---|"]
        lines += [f"| {c['label']} | {c['rel_error']:.3g} | {c['cosine']:.4f} | {c['worst_cosine']:.4f} |"
                  for c in q["checks"]]
    return "\n".join(lines) + "\n"
