"""moecc's logging: modules log to `logging.getLogger("moecc.<area>")`; the CLI's -v/-q pick the level.

    moecc compile ...        warnings (fallbacks, cache rebuilds) on stderr as `moecc: warning: ...`
    moecc -v compile ...     + choices (kernels per layer, passes, fallbacks' reasons)       INFO
    moecc -vv compile ...    + details (timings, cache paths)                                 DEBUG
    moecc -q compile ...     errors only

API users configure logging as they like (no handler is installed on import: Python's last-resort
handler shows warnings). Library chatter is quieted only inside the CLI call (`quiet_libraries`), and
only the libraries' own warnings: the user's warnings and the process's filters are left as they were.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

LOGGER = "moecc"
LIBRARY_LOGGERS = ("torch.onnx", "torch._export", "torch.export", "onnxscript")
LIBRARY_MODULES = r"(torch|onnxscript|onnx|onnxruntime|tvm|transformers|copyreg)(\.|$)"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected CLI)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"moecc: {record.levelname.lower()}: {record.getMessage()}"


def level_of(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


@contextlib.contextmanager
def cli_logging(verbose: int = 0, quiet: bool = False):
    """For one CLI call: moecc's records to stderr at the chosen level, libraries' chatter quieted;
    everything restored afterwards (main() may be called from Python, e.g. by tests)."""
    logger = logging.getLogger(LOGGER)
    handler = _Stderr()
    handler.setFormatter(_Format())
    saved = (logger.level, logger.propagate, {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS})
    logger.addHandler(handler)
    logger.setLevel(level_of(verbose, quiet))
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
