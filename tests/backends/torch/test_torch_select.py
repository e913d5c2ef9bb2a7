"""Kernel selection: cost model picks and says why, checkers reject, autotune tables round-trip,
torch.auto dispatches by token-count bucket, machine constants are cached."""
from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_numerically_equal
from test_torch_kernels import make_inputs

from moecc.backends.base import KernelChoice
from moecc.backends.torch import kernels, machine, select
from moecc.errors import MoeccError
from moecc.ops import call_moe, moe_reference
from moecc.spec import MoESpec, RouterSpec

# Constants of a 2-core machine like the one this was written on (measured, rounded): small-M
# GEMMs cost about as much as m=16, the weights' streaming dominates decode.
CONSTS = {"gemm_flops": 1.3e11, "bandwidth": 2.0e10, "op_overhead": 5e-6, "curve_dim": 4096,
          "gemm_curve": {"1": 0.0034, "2": 0.0062, "4": 0.0071, "8": 0.0088, "16": 0.0117, "32": 0.0160,
                         "64": 0.0230, "128": 0.0370, "256": 0.0600, "512": 0.1150}}
MIXTRAL = MoESpec(8, 1024, 3584, "swiglu", RouterSpec(top_k=2), name="mixtral")
DEEPSEEK = MoESpec(64, 1024, 512, "swiglu", RouterSpec(top_k=6, renormalize=False), shared_ffn=512, name="ds")
TINY = MoESpec(4, 8, 6, "swiglu", RouterSpec(top_k=2), name="tiny")
PREFILL = "torch.grouped_gemm"   # packed_gemm costs the same (kernels.PACKED_GAIN): the first of equals


@pytest.fixture(autouse=True)
def constants(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    machine.use(CONSTS)
    select.uninstall()
    yield
    machine.use(None)
    select.uninstall()


def test_decode_and_prefill_pick_different_kernels_and_say_why():
    decode = select.choose(DEEPSEEK, 1)
    prefill = select.choose(DEEPSEEK, 2048)
    assert isinstance(decode, KernelChoice) and decode.layer == "ds"
    assert decode.kernel == "torch.gather", decode
    assert prefill.kernel == PREFILL, prefill
    assert "cost model" in decode.reason and "T=1" in decode.reason
    # the per-expert loop pays for all 64 experts even when 6 are hit
    assert "torch.loop" in decode.rejected and "cost model" in decode.rejected["torch.loop"]
    assert "decode kernel" in prefill.rejected["torch.gather"]
    assert "E=64 > 8" in prefill.rejected["torch.dense_masked"]
    assert set(decode.rejected) | {decode.kernel} == set(kernels.KERNELS)


def test_costs_follow_the_work():
    g = kernels.KERNELS["torch.grouped_gemm"].cost
    assert g(MIXTRAL, 1) < g(MIXTRAL, 8) < g(MIXTRAL, 512) < g(MIXTRAL, 2048)
    # decode reads k of E experts: about k/E of a T=2048 pass's weight bytes, far less time
    assert g(MIXTRAL, 1) < g(MIXTRAL, 2048) / 50
    gather = kernels.KERNELS["torch.gather"].cost
    assert gather(MIXTRAL, 8) > gather(MIXTRAL, 1) * 6     # gather re-reads an expert per (token, slot)
    dense = kernels.KERNELS["torch.dense_masked"].cost
    assert dense(MIXTRAL, 1) > 3 * g(MIXTRAL, 1)           # all 8 experts instead of 2


def test_candidates_restrict_and_unknowns_fail():
    only = select.choose(MIXTRAL, 8, candidates=["torch.loop"])
    assert only.kernel == "torch.loop" and only.rejected == {}
    with pytest.raises(MoeccError, match="unknown torch kernel"):
        select.choose(MIXTRAL, 8, candidates=["torch.nope"])
    with pytest.raises(MoeccError, match="no torch kernel fits T=4096"):
        select.choose(DEEPSEEK, 4096, candidates=["torch.gather", "torch.dense_masked"])


def test_unknown_token_count_chooses_auto_with_a_bucket_plan():
    choice = select.choose(DEEPSEEK, 0)
    assert choice.kernel == select.AUTO
    assert "T<=1: torch.gather" in choice.reason and f"T<=inf: {PREFILL}" in choice.reason


def test_buckets():
    assert [select.bucket_of(t) for t in (1, 2, 8, 9, 64, 65, 512, 513, 10 ** 6)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_autotune_cache_round_trip_and_dispatch(tmp_path):
    table = select.autotune(TINY, tokens=(1, 8, 600), repeats=1)
    assert [b["tokens"] for b in table["buckets"]] == [1, 8, 600]
    for b in table["buckets"]:
        assert b["kernel"] in b["times_ms"] and b["kernel"] in kernels.KERNELS
        assert b["times_ms"][b["kernel"]] == min(b["times_ms"].values())
    assert "torch.gather" not in table["buckets"][2]["times_ms"]          # 600 x 2 slots > 64
    cache = tmp_path / "cache" / "autotune.json"
    stamp = cache.stat().st_mtime_ns
    assert select.autotune(TINY, tokens=(1, 8, 600), repeats=1) == table   # from the cache
    assert cache.stat().st_mtime_ns == stamp
    # an artifact carries the table as a file; the runtime installs it
    path = select.save({select.spec_key(TINY): table}, tmp_path / "art" / "kernels.json")
    loaded = select.load(path)
    assert loaded == json.loads(json.dumps({select.spec_key(TINY): table}))
    select.install(loaded)
    for t, b in ((1, 0), (5, 1), (600, 3)):
        want = next(e["kernel"] for e in table["buckets"] if e["bucket"] == select.bucket_of(t))
        if b != 3:
            assert select.dispatch(TINY, t) == want
    choice = select.choose(TINY, 8, table=table)
    assert choice.reason.startswith("autotuned") and choice.kernel == table["buckets"][1]["kernel"]


def test_auto_dispatch_runs_the_installed_kernel_per_bucket():
    """A hand-made table: T<=1 → dense_masked, T<=8 → loop, else grouped; each call routes by T."""
    table = {"buckets": [{"bucket": 0, "times_ms": {"torch.dense_masked": 1.0, "torch.loop": 2.0}},
                         {"bucket": 1, "times_ms": {"torch.loop": 1.0, "torch.grouped_gemm": 2.0}},
                         {"bucket": 2, "times_ms": {"torch.grouped_gemm": 1.0}}]}
    select.install({select.spec_key(TINY): table})
    assert [select.dispatch(TINY, t) for t in (1, 3, 40)] == ["torch.dense_masked", "torch.loop",
                                                              "torch.grouped_gemm"]
    for T in (1, 3, 40):
        inputs = make_inputs(TINY, T, seed=T)
        y = call_moe(*inputs[:4], TINY, kernel=select.AUTO)
        assert_numerically_equal(y, moe_reference(*inputs, TINY), atol=1e-10, rtol=1e-10, what=f"auto T={T}")


def test_dispatch_falls_back_when_the_bucket_kernel_refuses_the_count():
    table = {"buckets": [{"bucket": 4, "times_ms": {"torch.dense_masked": 1.0}}]}
    select.install({select.spec_key(TINY): table})
    assert select.dispatch(TINY, 600) == "torch.dense_masked"
    assert select.dispatch(TINY, 2 * 10 ** 6) == "torch.grouped_gemm"     # [T, E, R] too large


def test_broken_table_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "kernels.json"
    bad.write_text("{not json")
    with pytest.raises(MoeccError, match="cannot read kernel table"):
        select.load(bad)
    bad.write_text(json.dumps({"tables": {}}))
    with pytest.raises(MoeccError, match="not a moecc kernel table"):
        select.load(bad)


def test_machine_constants_measured_once_and_cached(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return machine.measure(quick=True)
    path = tmp_path / "m" / "machine.json"
    first = machine.load_or_measure(path, "k1", measure)
    assert first["gemm_flops"] > 1e8 and first["bandwidth"] > 1e8 and 0 < first["op_overhead"] < 1e-2
    assert set(first["gemm_curve"]) == {str(m) for m in machine.CURVE_M}
    assert machine.load_or_measure(path, "k1", measure) == json.loads(path.read_text())["k1"]
    assert len(calls) == 1
    machine.load_or_measure(path, "k2", measure)
    assert len(calls) == 2 and set(json.loads(path.read_text())) == {"k1", "k2"}


def test_gemm_time_interpolates_and_scales():
    t16, t32 = machine.gemm_time(16, 4096, 4096), machine.gemm_time(32, 4096, 4096)
    assert t16 == pytest.approx(0.0117) and t32 == pytest.approx(0.0160)
    assert t16 < machine.gemm_time(24, 4096, 4096) < t32
    assert machine.gemm_time(16, 1024, 1024) == pytest.approx(0.0117 / 16)
    assert machine.gemm_time(2048, 4096, 4096) == pytest.approx(0.1150 * 4)
    assert machine.gemm_time(0, 4096, 4096) == 0.0
    torch.testing.assert_close(torch.tensor(machine.op_time(10)), torch.tensor(5e-5))


def test_exported_program_with_auto_serves_tuned_buckets(tmp_path):
    """An artifact's life: export with kernel torch.auto, save the tuned table beside the program,
    load both in a fresh state, and every token count runs the bucket's kernel on the same math."""
    from moecc.nn import MoE
    torch.manual_seed(0)
    model = MoE(TINY, kernel=select.choose(TINY, 0).kernel).eval()
    assert model.kernel == select.AUTO
    x = torch.randn(2, 5, TINY.hidden)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    torch.export.save(program, tmp_path / "model.pt2")
    select.save({select.spec_key(TINY): select.autotune(TINY, tokens=(1, 8), repeats=1, cache=False)},
                tmp_path / "kernels.json")
    select.uninstall()
    assert select.install_file(tmp_path / "kernels.json") and not select.install_file(tmp_path / "none.json")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    reference = MoE(TINY).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for T in (1, 3, 20):
            x = torch.randn(2, T, TINY.hidden)
            assert_numerically_equal(loaded(x), reference(x), atol=1e-5, rtol=1e-5, what=f"T={2 * T}")


def test_remeasure_replaces_the_cache_entry(tmp_path):
    machine.use(None)
    path = tmp_path / "cache" / "machine.json"
    path.parent.mkdir(parents=True)
    stale = {**machine.measure(quick=True), "gemm_flops": 1.0}
    path.write_text(json.dumps({machine.machine_key(): stale, "other": {"x": 1}}))
    machine._cached.cache_clear()
    assert machine.constants()["gemm_flops"] == 1.0                     # the cache is read as is
    assert machine.constants() is machine.constants()                   # ... once per process
    fresh = machine.remeasure(quick=True)
    assert fresh["gemm_flops"] > 1e8 and machine.constants() == fresh
    assert json.loads(path.read_text())["other"] == {"x": 1}
    machine.use(CONSTS)
    assert machine.remeasure() is CONSTS                                  # overrides stay


def test_shape_curves_measured_once_per_shape(tmp_path):
    machine.use(None)
    machine._cached.cache_clear()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "machine.json").write_text(json.dumps({machine.machine_key(): CONSTS}))
    curve = machine.shape_curve(1024, 1024)
    assert set(curve) == {str(m) for m in machine.SHAPE_M} and all(t > 0 for t in curve.values())
    assert machine.shape_curve(8, 8) is None                                # tiny: the square curve
    assert machine.gemm_time(3, 1024, 1024) == pytest.approx(curve["3"])
    assert machine.gemm_time(5, 1024, 1024) == pytest.approx((curve["4"] + curve["6"]) / 2)
    stored = json.loads((tmp_path / "cache" / "gemm_shapes.json").read_text())
    assert list(stored) == [f"{machine.machine_key()}|1024x1024"]
    assert machine.gemm_time(64, 1024, 1024) > machine.gemm_time(32, 1024, 1024)   # continues the curve
    machine.use({**CONSTS, "shapes": {"1024x1024": {"1": 1.0, "2": 1.5}}})
    assert machine.gemm_time(2, 1024, 1024) == 1.5 and machine.shape_curve(4096, 4096) is None


def test_batched_skinny_path_makes_grouped_gemm_the_decode_kernel():
    """Where skinny.py's kernel runs, grouped_gemm loops over experts in C (no per-expert Python):
    fine-grained decode (6 of 64 experts + a shared one) picks it over gather; T=2048 does not batch."""
    machine.use({**CONSTS, "skinny": True})
    assert kernels.batched_expected(DEEPSEEK, 1) and kernels.batched_expected(DEEPSEEK, 64)
    assert not kernels.batched_expected(DEEPSEEK, 2048)
    assert select.choose(DEEPSEEK, 1).kernel == "torch.grouped_gemm"
    assert select.choose(DEEPSEEK, 2048).kernel == PREFILL
