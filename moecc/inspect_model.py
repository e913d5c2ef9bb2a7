"""`moecc inspect`: a table of a model's (or artifact's) FFN and MoE layers: E, k, params, FLOPs."""
from __future__ import annotations

from pathlib import Path

from .table import human, text_table

HEADERS = ["layer", "kind", "E", "k", "params", "active/token", "FLOPs/token"]


def _moe_row(name: str, spec) -> list:
    total, active = spec.params()
    return [name, f"moe ({spec.router.kind})", spec.num_experts, spec.top_k, total, active, 2 * active]


def rows_for_model(ref: str) -> tuple[str, list[list]]:
    from .frontend import capture
    from .loader import load_model
    from .passes.canonicalize import canonicalize
    from .passes.ffn_match import find_ffns
    from .passes.moe_rewrite import param
    from .pipeline import moe_nodes

    model, inputs = load_model(ref)
    c = capture(model, inputs, source=ref)
    gm = canonicalize(c.gm).graph_module
    rows = [_moe_row(spec.name or node.name, spec) for node, spec in moe_nodes(gm)]
    matches, _ = find_ffns(gm)
    for m in matches:
        p = sum(param(gm, n).numel() for n in (*m.w_in, *m.b_in, m.w_out, m.b_out) if n is not None)
        rows.append([m.name, f"ffn ({m.activation})", "-", "-", p, p, 2 * p])
    total = sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())
    return f"{ref}: {total:,} parameters in all", rows


def rows_for_artifact(path: Path) -> tuple[str, list[list]]:
    from .artifact import read_manifest
    from .spec import MoESpec
    m = read_manifest(path)
    rows = [_moe_row(layer["name"] or layer["node"], MoESpec.from_dict(
        {k: v for k, v in layer.items() if k in MoESpec.__dataclass_fields__})) for layer in m["layers"]]
    kernels = {k["layer"]: k["kernel"] for k in m["backend"]["kernels"]}
    v = m["verification"]
    status = "skipped" if v.get("skipped") else ("ok" if v.get("ok") else "FAILED") + f" ({v.get('text', '')})"
    head = (f"{path}: {m['source']} → {m['backend']['name']} (moecc {m['moecc_version']}); "
            f"kernels: {', '.join(sorted(set(kernels.values()))) or '-'}; verification {status}")
    q = m.get("quality")
    if q:
        head += (f"\nquality vs {q['against']}: {q['text']}\n(verification above compares the {m['backend']['name']} "
                 "artifact with the transformed graph; this line is what the passes changed)")
    return head, rows


def inspect(target: str) -> str:
    path = Path(target)
    head, rows = rows_for_artifact(path) if path.is_dir() else rows_for_model(target)
    if rows:
        rows.append(["total", "", "", "", sum(r[4] for r in rows), sum(r[5] for r in rows),
                     sum(r[6] for r in rows)])
    shown = [r[:4] + [human(x) for x in r[4:]] for r in rows]
    return head + "\n" + (text_table(HEADERS, shown) if rows else "(no FFN or MoE layers found)")


def routers_help() -> str:
    from .routing import ROUTER_HELP
    return text_table(["router", "what it does"], [[k, v] for k, v in ROUTER_HELP.items()], align_right=False)
