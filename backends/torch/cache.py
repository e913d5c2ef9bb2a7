"""moecc's per-user cache directory (a leaf module: imports nothing of moecc's).

    cache_dir() -> Path            $MOECC_CACHE_DIR or ~/.cache/moecc (JSON measurements, tables)
    private_dir(name) -> Path      cache_dir()/name, mode 0700, owned by this user (checked), for
                                   what the process executes (the C kernel's shared library)
    locked(path)                   an exclusive flock on `path` (+ a thread lock): one builder at a time

A directory that another user owns or can write to is refused (PermissionError): a library planted
there must never be loaded.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import threading

_thread_lock = threading.RLock()


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOECC_CACHE_DIR") or pathlib.Path.home() / ".cache" / "moecc")


def check_private(path: pathlib.Path) -> None:
    """`path` is ours and nobody else can write to it (nor, for a directory, list it)."""
    st = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"{path} is a symbolic link")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by other users (mode {oct(st.st_mode & 0o777)})")


def private_dir(name: str) -> pathlib.Path:
    """cache_dir()/name, created 0700; PermissionError when it is not private to this user."""
    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    check_private(path)
    if os.stat(path).st_mode & 0o077:
        raise PermissionError(f"{path} is readable by other users (mode {oct(os.stat(path).st_mode & 0o777)})")
    return path


@contextlib.contextmanager
def locked(path: pathlib.Path):
    """Hold an exclusive lock on `path` (created 0600) across processes and threads."""
    import fcntl
    with _thread_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
