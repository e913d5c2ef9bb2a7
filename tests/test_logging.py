"""Issue 15 item 16: moecc logs through `logging` ("moecc.*"), -v/-q on the CLI, and leaves the
process's warning filters and the user's own warnings alone."""
import logging
import warnings

import pytest

from moecc.cli import main

GPT = "samples/tiny_gpt.py:build"


@pytest.fixture(autouse=True)
def _cwd(root, monkeypatch):
    monkeypatch.chdir(root)


def test_cli_leaves_warning_filters_and_logger_levels_as_they_were(capsys):
    filters = list(warnings.filters)
    levels = {n: logging.getLogger(n).level for n in ("moecc", "torch.onnx", "onnxscript")}
    assert main(["inspect", "--routers"]) == 0
    assert main(["-q", "inspect", "--routers"]) == 0
    assert warnings.filters == filters
    assert {n: logging.getLogger(n).level for n in levels} == levels
    assert not logging.getLogger("moecc").handlers


def test_users_own_warning_is_shown(capsys):
    with pytest.warns(FutureWarning, match="my own deprecation notice"):
        assert main(["inspect", "tests/warning_model.py:build"]) == 0


@pytest.mark.parametrize("flags,shown", [([], False), (["-v"], True), (["-q"], False)])
def test_verbose_logs_kernel_choices_and_passes(flags, shown, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--out", str(out), "--no-verify", *flags]) == 0
    err = capsys.readouterr().err
    assert ("moecc: info: layer" in err and "kernel torch.auto" in err and "moecc: info: pass upcycle" in err) == shown


def test_onnx_fused_to_portable_fallback_is_a_logged_warning(tmp_path, capsys, monkeypatch):
    from moecc import api
    real, calls = api._lower_and_verify, []

    def fused_fails_once(captured, program, backend, options, *rest):
        lowered, check = real(captured, program, backend, options, *rest)
        calls.append(options["onnx_moe"])
        return (lowered, dict(check, ok=False, text="forced mismatch")) if len(calls) == 1 else (lowered, check)
    monkeypatch.setattr(api, "_lower_and_verify", fused_fails_once)
    assert main(["compile", "tests/perturbed_models.py:gpt", "--to", "onnx", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert calls == ["auto", "portable"]
    assert "moecc: warning: the fused ONNX Runtime MoE op did not match" in err and "forced mismatch" in err
