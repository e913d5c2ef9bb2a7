"""Issue 15 item 9: the run-time C kernel's cache is private, content-addressed (source, compiler,
flags), locked, rebuilt on a bad load, and falls back to BLAS with one logged warning."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading

import pytest

from moecc.backends.torch import skinny

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None or not skinny._cpu_ok(),
                                reason="needs a C compiler and AVX2")

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("MOECC_PLANTED_MARKER");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
void skinny_gemm(void) {}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOECC_NO_SKINNY", raising=False)
    skinny.reset()
    yield tmp_path / "cache"
    skinny.reset()


def _pointer(cache_root):
    return cache_root / "kernels" / f"skinny-{skinny.build_key(*skinny._compiler())}.sha256"


def _path(cache_root):                  # the library the pointer names (a predictable name if none)
    p = _pointer(cache_root)
    return skinny._library(p, p.read_text()) if p.exists() else p.with_suffix(".so")


def _old_path(cache_root):              # where the first version looked (any file there was loaded)
    return cache_root / f"skinny-{hashlib.sha1(skinny.SOURCE.encode()).hexdigest()[:12]}.so"


def _plant(path, tmp_path):
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)


def test_built_into_a_private_content_addressed_dir(cache):
    assert skinny.available()
    path = _path(cache)
    assert path.exists() and (path.parent.stat().st_mode & 0o777) == 0o700
    assert _pointer(cache).read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert skinny.build_key("cc", "gcc 1") != skinny.build_key("cc", "gcc 2")     # compiler in the key


def test_planted_library_is_never_loaded(cache, tmp_path, monkeypatch, caplog):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOECC_PLANTED_MARKER", str(marker))
    for p in (_path(cache), _old_path(cache)):
        _plant(p, tmp_path)
    with caplog.at_level(logging.WARNING, logger="moecc"):
        assert skinny.available()                  # rebuilt over the planted file
    assert not marker.exists(), "a planted library's constructor ran"


def test_dir_writable_by_others_is_refused(cache, tmp_path, monkeypatch, caplog):
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOECC_PLANTED_MARKER", str(marker))
    _plant(_path(cache), tmp_path)
    os.chmod(cache / "kernels", 0o777)
    with caplog.at_level(logging.WARNING, logger="moecc"):
        assert not skinny.available()
    assert not marker.exists()
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "writable by other users" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "missing symbol"])
def test_bad_cached_library_is_rebuilt(damage, cache, tmp_path, caplog):
    import sys                                     # built by another process (dlopen caches by path)
    subprocess.run([sys.executable, "-c", "from moecc.backends.torch import skinny; assert skinny.available()"],
                   check=True, env=dict(os.environ))
    path = _path(cache)
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"\x7fELF not really")
    else:
        _plant(path, tmp_path)                     # loads, but lacks skinny_moe
    _pointer(cache).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    path.rename(skinny._library(_pointer(cache), _pointer(cache).read_text()))
    with caplog.at_level(logging.WARNING, logger="moecc"):
        assert skinny.available()
    assert "rebuilding" in caplog.text


def test_failing_compiler_falls_back_once_and_is_not_retried(cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false"))
    with caplog.at_level(logging.WARNING, logger="moecc"):
        assert not skinny.available() and not skinny.available()
    assert len(caplog.records) == 1 and "using BLAS" in caplog.text
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: calls.append(cmd) or real(cmd, *a, **k))
    skinny.reset()
    assert not skinny.available()
    assert not any("-shared" in c for c in calls), "the failed build was retried"


def test_two_threads_build_once(cache, monkeypatch):
    builds = []
    real = skinny._build
    monkeypatch.setattr(skinny, "_build", lambda *a: builds.append(a) or real(*a))
    results = []
    threads = [threading.Thread(target=lambda: results.append(skinny.available())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and len(builds) == 1
