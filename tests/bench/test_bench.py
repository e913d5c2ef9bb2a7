"""`moecc bench` on tiny shapes (not timed): every implementation, ORT's fused op and the transformers
blocks included, computes the same layer; the report's files and target arithmetic are right."""
from __future__ import annotations

import json
import os

import pytest

from moecc import cli_bench
from moecc.backends.torch import machine
from moecc.bench import alternatives as bench_alts, grid as bench, report as bench_report
from moecc.spec import MoESpec, RouterSpec

# transformers' grouped_mm needs 16-byte strides: H, F multiples of 4
TINY = {
    "mixtral-tiny": MoESpec(4, 16, 12, "swiglu", RouterSpec(top_k=2), name="mixtral-tiny"),
    "deepseek-tiny": MoESpec(8, 16, 8, "swiglu", RouterSpec(top_k=3, renormalize=False), shared_ffn=8),
    "switch-tiny": MoESpec(4, 16, 24, "relu", RouterSpec(top_k=1, renormalize=False)),
    "sigmoid-tiny": MoESpec(4, 16, 8, "gelu", RouterSpec("sigmoid_topk", top_k=2)),
}
ALL = {"moecc:torch.loop", "moecc:torch.grouped_gemm", "moecc:torch.packed_gemm", "moecc:torch.dnn_gemm", "moecc:torch.grouped_mm", "moecc:torch.gather", "moecc:torch.dense_masked",
       "moecc:auto", "ref:dense_gemm", "ref:stream", "ort:fused", "hf:eager", "hf:grouped_mm"}


@pytest.fixture(scope="module")
def results():
    machine.use(machine.measure(quick=True))
    try:
        yield bench.run_bench(TINY, tokens=(1, 3), repeats=1, progress=False)
    finally:
        machine.use(None)


def test_every_implementation_computes_the_same_layer(results):
    assert len(results["points"]) == 8
    for p in results["points"]:
        if p["shape"] == "sigmoid-tiny":
            continue
        assert set(p["times"]) == ALL, p["shape"]
        assert p["chosen"] in p["times"]
        for name, err in p["errors"].items():
            assert err < 1e-5, (p["shape"], p["tokens"], name, err)
        assert p["limit_ms"] == max(p["compute_limit_ms"], p["memory_limit_ms"]) > 0
        assert 1 <= p["experts_hit"] <= TINY[p["shape"]].num_experts


def test_unsupported_alternatives_are_skipped_with_a_reason(results):
    skipped = results["shapes"]["sigmoid-tiny"]["skipped"]
    assert any(s.startswith("ort:fused: fused op routes softmax") for s in skipped)
    assert any(s.startswith("hf:eager:") for s in skipped)
    point = next(p for p in results["points"] if p["shape"] == "sigmoid-tiny")
    assert not {"ort:fused", "hf:eager", "hf:grouped_mm"} & set(point["times"])
    assert max(point["errors"].values()) < 1e-5


def test_tvm_kernels_join_the_same_run():
    machine.use(machine.measure(quick=True))
    try:
        res = bench.run_bench({"sigmoid-tiny": TINY["sigmoid-tiny"]}, tokens=(2,), repeats=1, progress=False,
                              alternatives=False, tvm=True)
    finally:
        machine.use(None)
    (point,) = res["points"]
    assert {"tvm:gather", "tvm:grouped_gemm", "tvm:dense_masked"} <= set(point["times"])
    assert max(point["errors"].values()) < 1e-5


def test_report_files(results, tmp_path):
    paths = bench_report.write(results, tmp_path / "out")
    md = paths["md"].read_text()
    assert not any(n.startswith("tvm:") for p in results["points"] for n in p["times"])
    assert "tvm not measured" in md and "tvm 3/" not in md       # no TVM run is not "TVM met"
    assert "| shape | T | limit ms" in md and "mixtral-tiny" in md and f"threads={results['threads']}" in md
    data = json.loads(paths["json"].read_text())
    assert data["threads"] == results["threads"] and len(data["summary"]) == 8
    assert all(isinstance(r["ok_selection"], bool) for r in data["summary"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_arithmetic():
    point = {"shape": "s", "tokens": 1, "compute_limit_ms": 1.0, "memory_limit_ms": 2.0, "limit_ms": 2.0,
             "chosen": "moecc:torch.loop",
             "times": {n: {"median_ms": v, "min_ms": v, "runs": 3} for n, v in
                       {"moecc:torch.loop": 2.6, "moecc:torch.gather": 2.1, "ort:fused": 2.0}.items()}}
    (row,) = bench_report.rows({"points": [point]})
    assert row["best"] == "moecc:torch.gather" and row["bound"] == "memory"
    assert row["chosen_over_best"] == pytest.approx(2.6 / 2.1) and not row["ok_selection"]
    assert row["best_over_limit"] == pytest.approx(1.05) and row["ok_limit"]          # ≤ 1.1 at T=1
    assert row["best_over_ort:fused"] == pytest.approx(1.05) and not row["ok_alternatives"]
    assert row["hf:eager"] is None and row["best_over_hf:eager"] is None
    assert bench_report.limit_target(64) == 1.3 and bench_report.limit_target(512) == 1.15
    assert bench_report.limit_target(1) == 1.1
    point["times"]["tvm:gather"] = {"median_ms": 2.1 * 1.3, "min_ms": 1.0, "runs": 3}
    point["times"]["tvm:loop"] = {"median_ms": 9.0, "min_ms": 1.0, "runs": 3}
    (row,) = bench_report.rows({"points": [point]})
    assert row["best_tvm"] == "tvm:gather" and row["tvm_over_best"] == pytest.approx(1.3) and not row["ok_tvm"]
    by_what = {t["what"]: t for t in bench_report.targets({"points": [point]})}
    assert by_what["best torch / limit, T=1"]["misses"] == []
    assert by_what["best TVM / best torch"]["misses"] == ["s T=1 1.30"]
    assert by_what["best torch / limit, T≥512"]["n"] == 0


def test_both_thread_counts_in_one_report(tmp_path):
    assert bench.thread_counts(3) == (3,)
    assert bench.thread_counts() == ((1,) if os.cpu_count() == 1 else (1, os.cpu_count()))
    machine.use(machine.measure(quick=True))
    try:
        res = bench.run_threads({"switch-tiny": TINY["switch-tiny"]}, tokens=(2,), repeats=1, counts=(1, 2),
                                progress=False, alternatives=False)
    finally:
        machine.use(None)
    assert [r["threads"] for r in res["runs"]] == [1, 2] and res["headline"] == 2
    assert all(r["shapes"]["switch-tiny"]["gemm_flops"] > 0 for r in res["runs"])   # a limit per count
    md = bench_report.markdown(res)
    assert md.index("## 2 thread(s)") < md.index("## 1 thread(s)")                    # headline first
    assert "| best torch / limit, T=8–64 | ≤1.30 |" in md and "2 thread(s) (load" in md
    paths = bench_report.write(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [len(r["summary"]) for r in data["runs"]] == [1, 1] and data["runs"][1]["targets"]


def test_alternative_refusals():
    assert bench_alts.ort_reason(MoESpec(4, 8, 8, "gelu")) is not None        # exact GELU is not the fused op's
    assert bench_alts.ort_reason(MoESpec(4, 8, 8, "gelu_tanh")) is None
    assert "renormalizes" in bench_alts.hf_reason(MoESpec(4, 8, 8, "swiglu", RouterSpec(renormalize=False)))


@pytest.mark.parametrize("argv, message", [(["--shapes", "gpt5-like"], "unknown shape"),
                                           (["--tokens", "1,x"], "comma-separated integers"),
                                           (["--tokens", "0"], ">= 1"), (["--threads", "0"], "--threads"),
                                           (["--clock", "cpu"], "pass --threads 1")])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert cli_bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_parser_wires_into_subparsers():
    import argparse
    parser = argparse.ArgumentParser(prog="moecc")
    sub = parser.add_subparsers(dest="command")
    cli_bench.add_bench_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--out", "o", "--threads", "2"])
    assert args.func is cli_bench.run and args.quick and args.out == "o" and args.threads == 2
