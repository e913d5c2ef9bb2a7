"""Ctrl-C during `tvm.compile` (SIGINT to the whole process group, as a terminal sends it) is
reported as `moecc: interrupted`, exit 130, nothing written, not as a TVM failure."""
import os
import signal
import subprocess
import sys
import time


def test_ctrl_c_during_tvm_compile_is_an_interrupt(root, tmp_path):
    out = tmp_path / "art"
    log = tmp_path / "log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "moecc", "compile", "samples/tiny_gpt.py:build", "--upcycle", "2",
                              "--top-k", "1", "--to", "tvm", "--no-verify", "-v", "--out", str(out)], cwd=root,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # -v: moecc logs "tvm.compile for target ..." as it enters tvm.compile; the library is written after
        while p.poll() is None and "tvm.compile for target" not in log.read_text():
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 130 and "moecc: interrupted" in text, text[-2000:]
    assert "TVM backend" not in text and "Traceback" not in text
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".art")]
