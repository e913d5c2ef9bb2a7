"""Early checks: every flag a command can judge alone is judged before the model is loaded (the
factory here fails if called) or the benchmark runs (run_bench is replaced by one that fails);
each is one line `moecc: error: ...`, exit 2, nothing written."""
import json

import numpy as np
import pytest
import torch

from moecc.cli import main
from moecc.errors import MoeccError

EARLY = "tests/early_models.py:must_not_load"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def _fails(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and msg in err and len(err.splitlines()) == 1, err
    assert "FACTORY CALLED" not in err and "BENCH RAN" not in err


@pytest.mark.parametrize("flags,msg", [
    (["--upcycle", "0"], "at least 2 experts, got E=0"),
    (["--moefy", "0"], "at least 2 experts, got E=0"),
    (["--upcycle", "4", "--router", "nope"], "--router 'nope' is unknown"),
    (["--upcycle", "4", "--kernel", "torch.nope"], "--kernel 'torch.nope' is not a torch kernel"),
    (["--upcycle", "4", "--to", "onnx", "--kernel", "torch.loop"], "is not a onnx kernel"),
    (["--upcycle", "4", "--layers", "every-0"], "every-N with N ≥ 1"),
    (["--upcycle", "4", "--layers", "0,x"], "--layers '0,x': use all, every-N"),
    (["--upcycle", "4", "--route-layers", "every-x", "--router", "hash"], "--route-layers 'every-x'"),
    (["--upcycle", "4", "--capacity-factor", "0"], "--capacity-factor must be > 0"),
    (["--upcycle", "4", "--capacity-factor", "-1.5"], "--capacity-factor must be > 0"),
    (["--upcycle", "4", "--tolerance", "-1"], "--tolerance must be > 0"),
    (["--upcycle", "4", "--tolerance", "nan"], "--tolerance must be > 0"),
    (["--upcycle", "4", "--n-groups", "0"], "--n-groups must be >= 1"),
    (["--upcycle", "4", "--n-groups", "2", "--topk-groups", "3"], "--topk-groups 3 exceeds --n-groups 2"),
    (["--moefy", "4", "--calibration", "no/such/file.txt"], "--calibration no/such/file.txt: no such file"),
    (["--upcycle", "4", "--to", "onnx", "--autotune"], "--autotune measures the torch kernels only"),
    (["--upcycle", "4", "--to", "tvm", "--autotune"], "--autotune measures the torch kernels only"),
    (["--upcycle", "4", "--passes", "upcycle,nope"], "unknown pass 'nope'"),
])
def test_compile_flags_checked_before_loading(flags, msg, tmp_path, capsys):
    _fails(["compile", EARLY, *flags, "--out", str(tmp_path / "X")], msg, capsys)
    assert not list(tmp_path.iterdir())


def test_compile_out_checked_before_loading(tmp_path, capsys):
    file = tmp_path / "f"
    file.write_text("mine")
    _fails(["compile", EARLY, "--upcycle", "4", "--out", str(file / "art")], "is a file, not a directory", capsys)
    _fails(["compile", EARLY, "--upcycle", "4", "--out", str(file), "--force"], "is a file", capsys)
    assert file.read_text() == "mine"


def test_factory_returning_no_inputs(tmp_path, capsys):
    _fails(["compile", "tests/early_models.py:none_inputs", "--upcycle", "4", "--out", str(tmp_path / "X")],
           "example_inputs a tensor or a non-empty tuple of tensors, got NoneType", capsys)


@pytest.fixture
def no_bench(monkeypatch):
    from moecc.bench import grid as bench

    def ran(*a, **k):
        raise AssertionError("BENCH RAN: the flag was checked after the benchmark")
    monkeypatch.setattr(bench, "run_bench", ran)


@pytest.mark.parametrize("flags,msg", [
    (["--repeats", "-3"], "--repeats must be >= 1, got -3"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--tokens", "0,8"], "--tokens values must be >= 1"),
])
def test_bench_flags_checked_before_running(flags, msg, no_bench, tmp_path, capsys):
    _fails(["bench", "--quick", "--out", str(tmp_path / "b"), *flags], msg, capsys)


def test_bench_out_refused_before_running(no_bench, tmp_path, capsys):
    earlier = tmp_path / "b"
    earlier.mkdir()
    (earlier / "bench.json").write_text("{}")
    _fails(["bench", "--quick", "--out", str(earlier)], "already holds bench.json from an earlier run; pass --force",
           capsys)
    assert (earlier / "bench.json").read_text() == "{}"
    file = tmp_path / "f"
    file.write_text("")
    _fails(["bench", "--quick", "--out", str(file)], "is a file, not a directory", capsys)
    _fails(["bench", "--quick", "--out", str(file / "sub")], "is a file, not a directory", capsys)
    with pytest.raises(AssertionError, match="BENCH RAN"):    # --force passes the check, then runs
        main(["bench", "--quick", "--out", str(earlier), "--force"])


@pytest.mark.parametrize("flags,msg", [
    (["--out", "EXISTING"], "already exists; pass --force"),
    (["--out", "t.txt"], "--out must end in .npz or .json"),
    (["--out", "FILE/t.npz"], "is a file, not a directory"),
    (["--out", "new.npz", "--windows", "0"], "--windows must be >= 1"),
    (["--out", "new.npz", "--calibration", "no/such.pt"], "--calibration no/such.pt: no such file"),
])
def test_trace_checked_before_loading(flags, msg, tmp_path, capsys):
    (tmp_path / "t.npz").write_bytes(b"earlier trace")
    (tmp_path / "f").write_text("")
    subst = {"EXISTING": str(tmp_path / "t.npz"), "FILE/t.npz": str(tmp_path / "f" / "t.npz"),
             "new.npz": str(tmp_path / "new.npz"), "t.txt": str(tmp_path / "t.txt")}
    flags = [subst.get(f, f) for f in flags]
    if "--calibration" not in flags:
        flags += ["--calibration", "corpus:calibration"]
    _fails(["trace", EARLY, *flags], msg, capsys)
    assert (tmp_path / "t.npz").read_bytes() == b"earlier trace"


@pytest.mark.parametrize("flags,msg", [
    (["--hidden", "-5", "--compare"], "--hidden must be >= 1, got -5"),
    (["--replicas", "-1", "--compare"], "--replicas must be >= 0"),
    (["--out", "EXISTING"], "already exists; pass --force"),
    (["--compare", "--plot", "EXISTING"], "--plot"),
])
def test_plan_checked_before_reading_the_trace(flags, msg, tmp_path, capsys):
    trace = tmp_path / "trace.npz"
    trace.write_bytes(b"not read: the flags are checked first")
    existing = tmp_path / "placement.json"
    existing.write_text("earlier")
    flags = [str(existing) if f == "EXISTING" else f for f in flags]
    _fails(["plan", "--trace", str(trace), "--topology", "2x4:slots=4", *flags], msg, capsys)
    assert existing.read_text() == "earlier"


def test_run_bad_files(tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"moecc_version": "0.1.0", "backend": "onnx"}))
    np.save(tmp_path / "tokens.npy", np.zeros((1, 4), np.int64))
    _fails(["run", str(art), "--input", str(tmp_path / "tokens.npy")], "is not a moecc", capsys)
    (art / "manifest.json").write_text(json.dumps({
        "moecc_version": "0.1.0", "backend": {"name": "onnx"},
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]}]}))
    _fails(["run", str(art), "--input", str(tmp_path / "tokens.npy")], "is a single .npy array; save the inputs "
           "as .npz", capsys)
    _fails(["run", str(art)], "run needs --input FILE.npz (or --example-input", capsys)


def test_api_checks_arguments_before_capture(tmp_path):
    import moecc
    from early_models import must_not_run
    model, inputs = must_not_run()
    out = tmp_path / "a"
    for passes, msg in [({"upcycle": {"num_experts": 4}}, "passes must be a list of (name, options) pairs"),
                        ([("upcycle", {"experts": 4})], "pass 'upcycle': unknown option 'experts'"),
                        (["upcycle"], "passes must be a list of (name, options) pairs"),
                        ([("upcycel", {})], "unknown pass 'upcycel'")]:
        with pytest.raises(MoeccError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            moecc.compile(model, inputs, passes=passes, out=out, progress=False)
    with pytest.raises(MoeccError, match="tolerance must be a number > 0"):
        moecc.compile(model, inputs, passes=[("upcycle", {"num_experts": 4})], out=out, tolerance=-1,
                      progress=False)
    assert not out.exists()
    assert isinstance(torch.randn(1), torch.Tensor)


def test_trace_with_calibration_the_model_cannot_take(tmp_path, capsys):
    """Calibration token ids beyond the vocabulary: one line naming the file, not a torch traceback."""
    cal = tmp_path / "wrong.pt"
    torch.save((torch.full((4, 8), 99999),), cal)
    _fails(["trace", "tests/early_models.py:small_moe_gpt", "--calibration", str(cal), "--out",
            str(tmp_path / "t.npz")], f"trace: the model does not run on the calibration data {cal}", capsys)
    assert not (tmp_path / "t.npz").exists()
