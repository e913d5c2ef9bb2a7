import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))      # cases, harness (also imported by worker.py)

import pytest  # noqa: E402


@pytest.fixture
def one_rank_group():
    """A real 1-rank gloo process group on 127.0.0.1 for the test's duration."""
    import torch.distributed as dist

    from moecc.distributed.comm import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
