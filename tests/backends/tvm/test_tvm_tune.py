"""backends/tvm/tune.py: every schedule the tuner can pick computes what the default does; a tuned artifact
equals the untuned one and the PyTorch reference; its database is in the artifact (hashed in the manifest)
and the cache, and compiling the same shapes again measures nothing (counted, not timed)."""
import json

import numpy as np
import pytest
import torch

from moecc import api
from moecc.artifact import sha256
from moecc.backends.tvm import lower, runtime, tune
from moecc.errors import MoeccError
from moecc.nn import MoE
from tvm_cases import spec

H = 16


@pytest.mark.parametrize("knobs", [{"tm": 8, "l2_block": 1 << 15, "ru": 1}, {"tm": 6, "l2_block": 1 << 18, "ru": 2},
                                   {"tm": 2, "l2_block": 1 << 10, "ru": 2}])
def test_segment_gemm_candidates_compute_the_same(knobs):
    """Segments of 0, 1, 5 and 13 rows (short last tiles) against numpy, with non-default knobs."""
    import tvm
    E, R, K, rng = 4, 12, 16, np.random.default_rng(0)
    counts = np.array([5, 0, 13, 1], dtype=np.int64)
    n = int(counts.sum())
    src, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((n, K), (E, R, K), (E, R)))
    dst = rng.permutation(n).astype(np.int64)
    func = tune.kernel("segment_gemm", E, R, K, "float32", 4, knobs).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), lower.resolve_target("llvm"))
    out = tvm.runtime.tensor(np.zeros((n, R), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (src, np.arange(n, dtype=np.int64), dst, counts,
                                                   np.cumsum(counts), w, b)], out)
    expert = np.repeat(np.arange(E), counts)
    want = np.zeros((n, R), np.float32)
    want[dst] = np.einsum("nk,nrk->nr", src, w[expert]) + b[expert]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_gather_candidates_respect_the_vector_split():
    assert [c["chains"] for c in tune.candidates("gather_gemv", 24, 4)] == [2, 1]      # K / V = 6
    seg = tune.candidates("segment_gemm", 16, 4)
    assert seg[0] == {"tm": 4, "l2_block": 1 << 16, "ru": 2} and len(seg) == 32      # the default first


def _layer(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    act = "swiglu" if kind == "grouped" else "gelu"
    return MoE(spec("moe", E=8, H=H, F=24, act=act, top_k=2), init_std=H ** -0.5).eval()


def _compile(model, out, options, verify=False):
    x = torch.randn(1, 6, H)
    api.compile(model, (x,), backend="tvm", out=out, options=options, progress=False, verify=verify)
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("kernel", ["tvm.grouped_gemm", pytest.param("tvm.gather", marks=pytest.mark.slow)])
def test_tuned_artifact_matches_untuned_and_reference(kernel, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    model = _layer(kernel)
    plain = _compile(model, tmp_path / "plain", {"kernel": kernel})
    assert "tuning" not in plain["backend"]["notes"]
    tuned = _compile(model, tmp_path / "tuned", {"kernel": kernel, "tune_trials": 4}, verify=True)
    notes = tuned["backend"]["notes"]["tuning"]
    assert notes["trials"] == 4 and notes["reused"] == 0 and notes["workloads"] == 2
    db = tmp_path / "tuned" / tune.DATABASE
    assert tuned["files"][tune.DATABASE] == sha256(db)                   # listed and hashed like the rest
    records = json.loads(db.read_text())["records"]
    assert sum(len(r["tried"]) for r in records.values()) == 4
    assert (tmp_path / "cache" / tune.TVM_CACHE).exists()

    x = np.random.default_rng(3).standard_normal((1, 9, H)).astype(np.float32)     # another token count
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    got_plain = runtime.load(tmp_path / "plain")([x])[0]
    got_tuned = runtime.load(tmp_path / "tuned")([x])[0]
    torch.testing.assert_close(torch.from_numpy(got_tuned), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got_tuned), torch.from_numpy(got_plain), rtol=1e-5, atol=1e-5)

    caplog.set_level("INFO", logger="moecc")
    again = _compile(model, tmp_path / "again", {"kernel": kernel, "tune_trials": 4})
    notes = again["backend"]["notes"]["tuning"]
    assert notes["trials"] == 0 and notes["reused"] == 2                 # nothing measured the second time
    assert "reusing the tuned schedule" in caplog.text
    assert json.loads((tmp_path / "again" / tune.DATABASE).read_text())["records"].keys() == records.keys()


def test_tune_trials_checked():
    with pytest.raises(MoeccError, match="--tune-trials"):
        lower.tuner_for(None, {"tune_trials": -1}, lower.resolve_target("llvm"))
