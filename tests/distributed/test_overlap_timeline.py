"""Timeline (intervals, overlap fraction by interval union, Chrome trace JSON) and the delayed
transport's channel on a one-rank gloo group (no timed assertions: only what a sleep guarantees)."""
import json

import pytest
import torch

from moecc.distributed.timeline import Timeline, write_chrome_trace


def test_overlap_fraction_by_interval_union(tmp_path):
    tl = Timeline(rank=1)
    tl.add("comm", "a", 0.0, 4.0)
    tl.add("comm", "b", 3.0, 6.0)            # overlaps a: comm union is [0, 6) = 6
    tl.add("compute", "x", 1.0, 2.0)
    tl.add("compute", "y", 5.0, 9.0)         # hidden: [1, 2) + [5, 6) = 2
    o = tl.overlap()
    assert o["comm"] == pytest.approx(6.0) and o["hidden"] == pytest.approx(2.0)
    assert o["fraction"] == pytest.approx(1 / 3) and o["compute"] == pytest.approx(5.0)
    doc = json.loads(write_chrome_trace([tl, Timeline(0)], tmp_path / "t.json").read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {(e["name"], e["tid"], e["ts"], e["dur"]) for e in xs} == {
        ("a", 1, 0.0, 4e6), ("b", 1, 3e6, 3e6), ("x", 0, 1e6, 1e6), ("y", 0, 5e6, 4e6)}
    assert doc["metadata"]["overlap"]["1"]["fraction"] == pytest.approx(1 / 3)
    assert Timeline.from_dict(tl.to_dict()).events == tl.events
    with pytest.raises(ValueError):
        tl.add("io", "z", 0, 1)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    from moecc.distributed.comm import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_delayed_transport_is_a_fifo_channel(one_rank_group):
    from moecc.distributed.transport import DelayedTransport
    tl = Timeline(0)
    tr = DelayedTransport(alpha=0.02, beta=0.0, timeline=tl)
    try:
        t = torch.arange(6.0).view(3, 2)
        pend = [tr.all_to_all(t, [3], [3], None, f"c{i}", async_op=True) for i in range(3)]
        outs = [p.wait() for p in pend]
        assert all(torch.equal(o, t) for o in outs)
        g = tr.all_gather(torch.tensor([7], dtype=torch.int64), None, "gather")
        assert g.tolist() == [[7]]
    finally:
        tr.close()
    comm = sorted(tl.intervals("comm"))
    assert tr.calls == 4 and len(comm) == 4
    assert all(b - a >= 0.02 for a, b in comm)                      # each call lasts >= alpha
    assert all(comm[i + 1][0] >= comm[i][0] + 0.02 for i in range(3))  # one at a time, in order
