import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import moecc.ops  # noqa: E402,F401

torch.set_num_threads(1)


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long campaigns (property tests at scale); run with MOECC_SLOW=1 "
                                       "or `make test-slow`")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MOECC_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow campaign: MOECC_SLOW=1 (make test-slow) runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
