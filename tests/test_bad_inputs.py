"""Issue 15 item 14: the bad-input campaign. Every case: one line `moecc: error: ...`, a non-zero exit,
no traceback, nothing half-written, nothing the user had lost. (Flag checks live in F's tests; this
file covers files, artifacts, disk full and Ctrl-C.) Counts per class are in README "Bad input"."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moecc.cli import main

GPT = "samples/tiny_gpt.py:build"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "art"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["compile", GPT, "--upcycle", "2", "--top-k", "1", "--no-verify", "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    return out


def _fails(args, msg, capsys, code=2):
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and msg in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def _files(tmp_path, kind):
    """A bad file of `kind` under tmp_path."""
    p = tmp_path / f"bad_{kind}"
    if kind == "dir":
        p.mkdir()
    elif kind == "text":
        p = p.with_suffix(".py")
        p.write_text("this is not python (\n")
    elif kind == "binary":
        p = p.with_suffix(".py")
        p.write_bytes(b"\x00\x01PK\x03\x04" * 10)
    elif kind == "empty":
        p = p.with_suffix(".py")
        p.write_text("")
    return p


@pytest.mark.parametrize("kind,msg", [("dir", "is not a file"), ("text", "importing"), ("binary", "importing"),
                                      ("empty", "has no callable 'build'")])
@pytest.mark.parametrize("verb", ["compile", "inspect"])
def test_model_file_that_is_not_a_model(verb, kind, msg, tmp_path, capsys):
    ref = f"{_files(tmp_path, kind)}:build"
    args = ["compile", ref, "--upcycle", "2", "--out", str(tmp_path / "o")] if verb == "compile" else ["inspect", ref]
    _fails(args, msg, capsys)
    assert not (tmp_path / "o").exists()


def test_out_beneath_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    _fails(["compile", GPT, "--upcycle", "2", "--out", str(tmp_path / "file" / "art")], "is a file", capsys)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("what,msg", [("missing", "not a moecc artifact"), ("empty-dir", "not a moecc artifact"),
                                      ("file", "not a moecc artifact")])
@pytest.mark.parametrize("verb", ["run", "inspect"])
def test_not_an_artifact(verb, what, msg, tmp_path, capsys):
    target = tmp_path / "x"
    if what == "empty-dir":
        target.mkdir()
    elif what == "file":
        target.write_text("{}")
    if verb == "inspect" and what != "empty-dir":
        msg = ""                                    # inspect also takes MODEL refs: any one clear line
    np.savez(tmp_path / "in.npz", tokens=np.zeros((1, 4), np.int64))
    args = ["run", str(target), "--input", str(tmp_path / "in.npz")] if verb == "run" else ["inspect", str(target)]
    _fails(args, msg, capsys)


@pytest.mark.parametrize("content,msg", [(b"tokens,1,2\n", "npz"), (b"", "npz"), (b"PK\x03\x04junk", "npz")])
def test_run_input_that_is_not_an_npz(content, msg, art, tmp_path, capsys):
    bad = tmp_path / "in.npz"
    bad.write_bytes(content)
    _fails(["run", str(art), "--input", str(bad)], msg, capsys)


def _compile_in_subprocess(out: Path, prelude: str = "", extra=()):
    code = (prelude + "\nimport sys\nfrom moecc.cli import main\n"
            f"sys.exit(main(['compile', '{GPT}', '--upcycle', '2', '--top-k', '1', '--no-verify', "
            f"'--out', {str(out)!r}, *{list(extra)!r}]))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


DISK_FULL = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))")


def test_disk_full_is_one_line_and_writes_nothing(tmp_path):
    p = _compile_in_subprocess(tmp_path / "art", DISK_FULL)
    _, err = p.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], err[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_disk_full_with_force_keeps_the_old_artifact(backend, art, tmp_path):
    """onnx and tvm compiles on a full disk, replacing an artifact (--force): one line, exit 2, no temp dir,
    the old artifact intact (LLVM exited the process on a failed write: TVM's library is written in a
    child process, backends/tvm/library.py)."""
    import shutil
    out = tmp_path / "art"
    shutil.copytree(art, out)
    before = {q.name: q.read_bytes() for q in out.iterdir()}
    p = _compile_in_subprocess(out, DISK_FULL, extra=["--to", backend, "--force"])
    _, err = p.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], err[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]
    assert {q.name: q.read_bytes() for q in out.iterdir()} == before


def test_ctrl_c_mid_compile_keeps_the_old_artifact(art, tmp_path):
    out = tmp_path / "art"
    import shutil
    shutil.copytree(art, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = _compile_in_subprocess(out, extra=["--force"])
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:     # wait until the temp dir exists: mid-write
        if any(x.name.startswith(".art.") for x in tmp_path.iterdir()):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode in (130, 0), err[-3000:]           # 0: it finished before the signal landed
    if p.returncode == 130:
        assert err.strip().splitlines()[-1] == "moecc: interrupted" and "Traceback" not in err
        assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]          # no temp dir left
    json.loads((out / "manifest.json").read_text())


def test_ctrl_c_wrapped_by_a_library_is_still_an_interrupt(monkeypatch, capsys):
    """A SIGINT that lands inside an import is re-raised by dataclasses' __set_name__ as a RuntimeError
    caused by the KeyboardInterrupt (the fresh-clone CI hit it): exit 130 and one line, no traceback."""
    from moecc import cli

    def wrapped(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e

    def crash(_args):
        raise RuntimeError("a real bug")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for p in parser._subparsers._group_actions[0].choices.values():
        p.set_defaults(func=wrapped)
    assert cli.main(["inspect", "x"]) == 130
    assert capsys.readouterr().err.strip() == "moecc: interrupted"
    for p in parser._subparsers._group_actions[0].choices.values():
        p.set_defaults(func=crash)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["inspect", "x"])
