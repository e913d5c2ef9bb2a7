"""Coverage: every MoE family of the installed transformers through moecc to torch, ONNX and TVM.

    python samples/coverage.py                      # all families → samples/results/coverage.{md,json}
    python samples/coverage.py --quick              # a small slice (3 families), results in --out
    python samples/coverage.py --families mixtral,dots1 --backends torch,onnx

Per family (samples/coverage_models.py: a tiny random causal LM, fp32, offline), in a child process
with a time limit: how moecc captured its MoE layers (the ExpertsInterface → moecc::experts, a
recognizer → moecc::moe, or ordinary ops with the reason), then lowered (as `moecc.compile` does, once
captured) to each backend and the artifact run on a token count the example did not have (1×5 vs 2×8), compared with HF eager (max abs
error on the logits; exact = ≤ 1e-4). Beside it, transformers' own ONNX exporter
(`transformers.exporters.OnnxExporter`) on the same model and the same check. `make coverage` runs it all.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ("torch", "onnx", "tvm")
TOL = 1e-4
QUICK = ("mixtral", "dots1", "nemotron_h")
# why a family still fails, where we found out (shown under the table)
REASONS = {
    "jamba": "its Mamba layers' torch path scans token by token (`for index in range(seq_len)` in "
             "`mamba_selective_scan`), so torch.export fixes the sequence length to the example's: no "
             "exporter gets a graph for another length (transformers' own was not run for it either)",
}
CHECK = (1, 5)                    # batch, seq of the check input (the example is 2×8)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _line(e: BaseException) -> str:
    text = _plain(str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _err(got, want) -> float:
    import torch
    got = torch.as_tensor(got).float()
    if got.shape != want.shape:
        raise ValueError(f"output shape {tuple(got.shape)} != logits {tuple(want.shape)}")
    e = (got - want.float()).abs().max().item()
    return e if e == e else float("inf")


def _verdict(err: float) -> dict:
    return {"ok": bool(err <= TOL), "err": err, "error": None if err <= TOL else f"max abs error {err:.3g} > {TOL}"}


def _how(recognized: dict) -> dict:
    iface = recognized.get("experts_interface", {})
    adapt = recognized.get("experts_adapters", {})
    rec = recognized.get("recognized", [])
    how = {"interface": len(iface.get("captured", [])), "adapter": len(adapt.get("captured", [])),
           "recognizer": len(rec),
           "refused": [f"{r['path']}: {r['reason']}" for r in iface.get("refused", []) + adapt.get("refused", [])]
           + [f"{r['path']}: {r['reason']}" for r in recognized.get("refused", [])]
           + [f"{r['path']}: {r['reason']}" for r in recognized.get("unrecognized", [])]}
    kinds = [k for k in ("interface", "adapter", "recognizer") if how[k]]
    how["how"] = "+".join(kinds) if kinds else "ordinary ops"
    if not kinds and not how["refused"]:
        how["refused"] = ["no MoE block found by either path"]
    return how


def _emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)       # after each stage: a timeout keeps what was done


def run_one(model_type: str, backends: list[str], hf_onnx: bool) -> dict:
    """One family, in this process: the row of the table. The model is captured once (moecc.capture +
    the default passes, as `moecc.compile` does), then lowered by each backend into an artifact folder
    that is loaded by that backend's runtime and run on the check input."""
    import torch
    import coverage_models as cm
    from moecc import backends as moecc_backends
    from moecc.api import transform
    from moecc.frontend import capture

    row = {"model_type": model_type}
    t0 = time.time()
    model, inputs = cm.build(model_type)
    check = torch.randint(2, cm.VOCAB, CHECK, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(check).logits
    cap = capture(copy.deepcopy(model), inputs, source=model_type)
    row["captured"] = _how(cap.recognized)
    transform(cap, [])
    with torch.no_grad():
        row["reference"] = _verdict(_err(cap.gm(check).logits, want))
    program = cap.export()
    row["seconds_capture"] = round(time.time() - t0, 1)
    _emit(row)
    for b in backends:
        t1 = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                moecc_backends.get(b).lower(program, Path(tmp), {})
                run = moecc_backends.runtime(b).load(Path(tmp), {"backend": {"name": b}})
                row[b] = _verdict(_err(run([check.numpy()])[0], want))
        except Exception as e:             # one line per backend, the sweep goes on
            row[b] = {"ok": False, "err": None, "error": _line(e)}
        row[b]["seconds"] = round(time.time() - t1, 1)
        _emit(row)
    if hf_onnx:
        t1 = time.time()
        row["hf_onnx"] = dict(_hf_onnx(model, inputs, check, want), seconds=round(time.time() - t1, 1))
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _hf_onnx(model, inputs, check, want) -> dict:
    try:
        from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter
        model = copy.deepcopy(model)
        try:
            model.set_experts_implementation("grouped_mm")    # transformers' default, as a user would export
        except ValueError:                                    # a family without the experts interface
            pass
        exported = OnnxExporter().export(model, {"input_ids": inputs[0]},
                                         config=OnnxConfig(dynamic=True))
        out = exported(input_ids=check)
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out[0])
        return _verdict(_err(logits, want))
    except Exception as e:
        return {"ok": False, "err": None, "error": _line(e)}


def _child(args) -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(HERE))
    try:
        row = run_one(args.one, args.backends.split(","), not args.no_hf_onnx)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        row = {"model_type": args.one, "build_error": _line(e)}
    _emit(row)


def sweep(fams, backends: list[str], hf_onnx: bool, timeout: int, jobs: int = 1, done: dict | None = None,
          on_row=None, only=None) -> list[dict]:
    """One row per family (child processes, `jobs` at a time); `done`: rows kept from an earlier run
    (not run again); `only`: the names to run (others without a row are left out); on_row(rows) after
    each family (the results are written as they come)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm
    rows = {f.name: done[f.name] for f in fams if done and f.name in done}
    todo = [f for f in fams if f.name not in rows and (not only or f.name in only)]
    for f in todo:
        if not f.text:
            rows[f.name] = {"family": f.name, "model_type": f.model_type, "text": False,
                            "build_error": "not a text family (no causal LM of its own); not built"}
    todo = [f for f in todo if f.text]
    ordered = lambda: [rows[f.name] for f in fams if f.name in rows]            # noqa: E731
    with tqdm(total=len(todo), unit="family", file=sys.stderr) as bar, ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(_spawn, f, backends, hf_onnx, timeout): f for f in todo}
        for fut in as_completed(futures):
            f = futures[fut]
            rows[f.name] = dict(fut.result(), family=f.name, text=True)
            bar.set_description(f.name)
            bar.update(1)
            if on_row is not None:
                on_row(ordered())
    return ordered()


def _spawn(f, backends, hf_onnx, timeout) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f.model_type, "--backends", ",".join(backends)]
    cmd += [] if hf_onnx else ["--no-hf-onnx"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rows = [ln[4:] for ln in out.splitlines() if ln.startswith("ROW ")]
        if not rows:
            return {"model_type": f.model_type, "build_error": f"timed out after {timeout} s (before capture ended)"}
        row = json.loads(rows[-1])
        for stage in [*backends, *(["hf_onnx"] if hf_onnx else [])]:
            if stage not in row:
                row[stage] = {"ok": False, "err": None, "error": f"timed out (the family's {timeout} s)"}
                break
        return row
    rows = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    if rows:
        row = json.loads(rows[-1])
        for stage in [*backends, *(["hf_onnx"] if hf_onnx else [])]:
            if "build_error" not in row and stage not in row:          # the child died in this stage
                row[stage] = {"ok": False, "err": None, "error": f"the process died (exit {p.returncode}): {tail[:200]}"}
                break
        return row
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model_type": f.model_type, "build_error": f"exit {p.returncode}: {tail[:300]}"}


def kept_hf_onnx(rows: list[dict], before: dict) -> list[dict]:
    """Rows run without transformers' exporter (--no-hf-onnx) keep that column from the earlier run
    of the same family (it does not depend on moecc), marked as carried over."""
    out = []
    for r in rows:
        old = before.get(r["family"], {}).get("hf_onnx")
        if "hf_onnx" not in r and "build_error" not in r and old is not None:
            r = dict(r, hf_onnx=dict(old, carried=True))
        out.append(r)
    return out


def summary(rows: list[dict], backends: list[str]) -> dict:
    text = [r for r in rows if r.get("text")]
    def exact(r):
        return all(r.get(b, {}).get("ok") for b in backends)
    nodes = [r for r in text if r.get("captured", {}).get("how", "ordinary ops") != "ordinary ops"]
    return {"text_families": len(text), "all_families": len(rows),
            "exact_all_backends": sum(exact(r) for r in text),
            "exact_all_backends_as_moecc_nodes": sum(exact(r) for r in nodes),
            "captured_as_moecc_nodes": len(nodes),
            **{f"{b}_ok": sum(bool(r.get(b, {}).get("ok")) for r in text) for b in backends},
            "hf_onnx_ok": sum(bool(r.get("hf_onnx", {}).get("ok")) for r in text),
            "hf_onnx_exported_moecc_onnx_not": sorted(r["family"] for r in text if r.get("hf_onnx", {}).get("ok")
                                                      and not r.get("onnx", {}).get("ok"))}


def _cell(v: dict | None) -> str:
    if not v:
        return "–"
    mark = " (*)" if v.get("carried") else ""
    if v.get("ok"):
        return f"ok {v['err']:.1e}{mark}"
    return "error: " + _plain(v.get("error") or "?").replace("|", "/") + mark


def markdown(rows: list[dict], backends: list[str], meta: dict) -> str:
    s = meta["summary"]
    pending = meta.get("not_run", [])
    lines = ["# moecc coverage of transformers MoE families", "",
             f"Generated by `make coverage` (samples/coverage.py) with transformers {meta['transformers']}, "
             f"torch {meta['torch']}, on {meta['date']} (a shared 2-core CPU machine). Tiny random fp32 causal "
             f"LMs; each artifact is run on a {CHECK[0]}×{CHECK[1]} input (the example was 2×8) and compared with "
             f"HF eager: `ok` = max abs error on the logits ≤ {TOL}.", "",
             f"- MoE families found: {meta.get('found', '?')}, of which text families: {meta.get('found_text', '?')}; "
             f"text families run: {s['text_families']}",
             f"- families whose MoE layers became moecc nodes: {s['captured_as_moecc_nodes']}",
             f"- exact on all of {', '.join(backends)}: {s['exact_all_backends']} "
             f"({s['exact_all_backends_as_moecc_nodes']} of them with moecc nodes)",
             *[f"- {b}: {s[f'{b}_ok']} ok" for b in backends],
             f"- transformers' own ONNX exporter: {s['hf_onnx_ok']} ok",
             f"- exported by transformers but not by moecc's ONNX backend: "
             f"{', '.join(s['hf_onnx_exported_moecc_onnx_not']) or 'none'}", "",
             "| family | captured | reference | " + " | ".join(backends) + " | transformers ONNX |",
             "|---|---|---|" + "---|" * len(backends) + "---|"]
    for r in rows:
        if not r.get("text"):
            continue
        if "build_error" in r:
            lines.append(f"| {r['family']} | not built: {r['build_error'].replace('|', '/')} |" + " |" * (len(backends) + 2))
            continue
        c = r["captured"]
        how = c["how"] + (f" ({sum(c.get(k, 0) for k in ('interface', 'adapter', 'recognizer'))} layers)"
                          if c["how"] != "ordinary ops" else "")
        if c["refused"]:
            how += "; " + c["refused"][0].replace("|", "/")[:160]
        cells = [_cell(r.get("reference"))] + [_cell(r.get(b)) for b in backends] + [_cell(r.get("hf_onnx"))]
        lines.append(f"| {r['family']} | {how} | " + " | ".join(cells) + " |")
    other = [r["family"] for r in rows if not r.get("text")]
    failing = [r["family"] for r in rows if r.get("text") and r["family"] in REASONS and not all(
        (r.get(b) or {}).get("ok") for b in backends)]
    if failing:
        lines += ["", "Why the remaining families fail:", ""] + [f"- {f}: {REASONS[f]}" for f in failing]
    if any(r.get("hf_onnx", {}).get("carried") for r in rows):
        lines += ["", "(*) transformers' exporter was not run again for this row (`--no-hf-onnx`): its cell is "
                      "from the family's earlier run (it does not depend on moecc)."]
    lines += ["", f"Not text families (listed, not built): {', '.join(other) or 'none'}.", ""]
    if pending:
        lines += [f"Not run yet (the sweep was stopped; `python samples/coverage.py --resume` runs them): "
                  f"{', '.join(pending)}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated transformers.models names (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--no-hf-onnx", action="store_true", help="skip transformers' own ONNX exporter")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per family")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for coverage.md / coverage.json")
    ap.add_argument("--jobs", type=int, default=1, help="families run at the same time")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out/coverage.json "
                    "(with --families: run those again, keep the others); families that did not build or timed out run again")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite coverage.md from --out/coverage.json without running anything")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _child(args)
        return 0
    sys.path.insert(0, str(HERE))
    import torch
    import transformers
    import coverage_models as cm
    fams = cm.families()
    wanted = QUICK if args.quick else (args.families.split(",") if args.families else None)
    if wanted:
        unknown = set(wanted) - {f.name for f in fams}
        if unknown:
            print(f"error: not MoE families of transformers {transformers.__version__}: {sorted(unknown)}",
                  file=sys.stderr)
            return 2
    backends = args.backends.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done, before = None, {}
    if args.resume and (out / "coverage.json").exists():     # keep the other rows; run `wanted` again
        before = {r["family"]: r for r in json.loads((out / "coverage.json").read_text())["rows"]}
        done = {name: r for name, r in before.items()      # a full resume retries the ones that did not build
                if (name not in wanted if wanted else not (r.get("text") and "build_error" in r))}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "tolerance": TOL, "check_input": CHECK,
            "backends": backends}

    def write(rows):
        meta["summary"] = summary(rows, backends)
        meta["found"], meta["found_text"] = len(fams), sum(f.text for f in fams)
        meta["not_run"] = sorted({f.name for f in fams if f.text} - {r["family"] for r in rows})
        (out / "coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (out / "coverage.md").write_text(markdown(rows, backends, meta))

    if args.report_only:
        old = json.loads((out / "coverage.json").read_text())
        meta.update({k: old["meta"][k] for k in ("date", "backends") if k in old["meta"]})
        write(old["rows"])
        print(json.dumps(meta["summary"]))
        return 0
    rows = sweep(fams, backends, not args.no_hf_onnx, args.timeout, args.jobs, done,
                 on_row=lambda rows: write(kept_hf_onnx(rows, before)), only=wanted)
    write(kept_hf_onnx(rows, before))
    print(json.dumps(meta["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
