"""Write a compiled TVM library (`export_library`) so that a failed write is an error, not an exit.

    executable.export_library(path)  ⇒  the same, in a forked child; its exit status and stderr come back

LLVM ends the process on a write error (`report_fatal_error("IO failure on output stream: File too
large")`, exit 1, from inside TVM's object emission): a full disk or `RLIMIT_FSIZE` would kill moecc
before it could say so in one line or remove its temp dir. The child writes the object and links it
(TVM calls the C compiler); the parent turns the child's failure into an OSError (disk full, file too
large: the artifact writer's one-line message) or a MoeccError naming the library. Where os.fork does
not exist, the library is written in-process.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from moecc.errors import MoeccError

_WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def export(executable, path: Path) -> None:
    """executable.export_library(path), in a child process where the platform can fork."""
    if not hasattr(os, "fork"):
        executable.export_library(str(path))
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                   # the child: write, report, exit
        code = 1
        try:
            os.close(r)
            os.dup2(w, 2)                                          # LLVM's fatal message goes to fd 2
            executable.export_library(str(path))
            code = 0
        except BaseException as e:                                 # noqa: BLE001 (reported to the parent)
            os.write(2, f"{type(e).__name__}: {e}".encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return
    for code in _WRITE_ERRORS:
        if os.strerror(code) in err:
            raise OSError(code, os.strerror(code), str(path))
    last = err.splitlines()[-1] if err else f"the writer exited with status {os.waitstatus_to_exitcode(status)}"
    raise MoeccError(f"TVM backend: writing the library {Path(path).name} failed: {last}")
