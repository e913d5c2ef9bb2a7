"""Where the communication that was not hidden went, from a Chrome trace of samples/overlap_bench.py
(overlap_trace*.json): per rank, the exposed (not under any compute interval) time of each
collective, grouped by kind (split sizes, the first dispatch, later dispatches, combines but the
last, the last combine), and the compute per rank.

    python samples/overlap_exposed.py samples/results/overlap_trace.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moecc.distributed.costmodel import intersection, union
from moecc.table import md_table

GROUPS = ("split sizes", "first dispatch", "later dispatches", "combines but the last", "last combine")


def _group(name: str, first_dispatch: str, last_combine: str) -> str:
    if "split sizes" in name:
        return GROUPS[0]
    if "dispatch" in name:
        return GROUPS[1] if name == first_dispatch else GROUPS[2]
    return GROUPS[4] if name == last_combine else GROUPS[3]


def exposed(trace: dict) -> list[dict]:
    """Per rank: {"rank", "comm", "compute", "hidden", group: exposed seconds}."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    out = []
    for rank in sorted({e["pid"] for e in ev}):
        mine = sorted((e for e in ev if e["pid"] == rank), key=lambda e: e["ts"])
        comp = [(e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6) for e in mine if e["cat"] == "compute"]
        comm = [e for e in mine if e["cat"] == "comm"]
        disp = [e["name"] for e in comm if "dispatch" in e["name"]]
        comb = [e["name"] for e in comm if "combine" in e["name"]]
        row = {"rank": rank, **{g: 0.0 for g in GROUPS}}
        for e in comm:
            a, b = e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6
            g = _group(e["name"], disp[0] if disp else "", comb[-1] if comb else "")
            row[g] += (b - a) - intersection([(a, b)], comp)
        ivs = [(e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6) for e in comm]
        row["comm"] = sum(b - a for a, b in union(ivs))
        row["compute"] = sum(b - a for a, b in union(comp))
        row["hidden"] = intersection(ivs, comp)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    return md_table(["rank", "comm ms", "compute ms", "hidden", *[f"exposed: {g} ms" for g in GROUPS]],
                    [[r["rank"], f"{r['comm'] * 1e3:.1f}", f"{r['compute'] * 1e3:.1f}",
                      f"{r['hidden'] / r['comm']:.0%}" if r["comm"] else "-",
                      *[f"{r[g] * 1e3:.1f}" for g in GROUPS]] for r in rows])


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"## {path}\n")
        print(table(exposed(json.loads(Path(path).read_text()))))
        print()
