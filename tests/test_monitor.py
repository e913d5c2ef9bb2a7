"""Utilization monitor: evenness by hand, per-layer records over steps (forward only), table and
plot, dynamic capacity from observed demand, and captured graphs."""
import math

import pytest
import torch

from moecc.frontend import capture
from moecc.errors import MoeccError
from moecc.monitor import Monitor, dynamic_capacity, evenness
from moecc.nn import MoE
from moecc.routing import dropped_fraction, route
from moecc.spec import MoESpec, RouterSpec


def model(router=RouterSpec("softmax_topk", 2)):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[MoE(MoESpec(4, 8, 16, router=router), init_std=0.2) for _ in range(2)])
    for m in net:
        torch.nn.init.normal_(m.router.weight)
    return net


def test_evenness_by_hand():
    assert evenness(torch.tensor([1.0, 1, 1, 1])) == {"max_over_mean": 1.0, "entropy": 1.0, "cv": 0.0}
    e = evenness(torch.tensor([4.0, 0, 0, 0]))
    assert (e["max_over_mean"], e["entropy"]) == (4.0, 0.0)
    e = evenness(torch.tensor([2.0, 2, 0, 0]))
    assert e["max_over_mean"] == 2.0 and e["entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert e["cv"] == pytest.approx(1.0)
    assert math.isnan(evenness(torch.zeros(3))["entropy"])


def test_records_each_layer_once_per_step_even_when_training(tmp_path):
    net = model().train()
    mon = Monitor(net)                                                    # names layers "0", "1"
    x = torch.randn(3, 5, 8)
    for step in range(3):
        with mon.step(step):
            net(x).pow(2).sum().backward()                                # backward recomputes: not recorded
    assert mon.layers() == ["0", "1"] and mon.steps() == [0, 1, 2]
    h = mon.series("0")
    assert len(h) == 3 and all(s.tokens == 15 and s.load.sum() == 30 for s in h)   # T·k
    with torch.no_grad():
        ids = route(net[0].router_logits(x).reshape(15, 4), net[0].spec)[1]
    ref = torch.bincount(ids.reshape(-1), minlength=4).float()
    assert torch.equal(h[0].load, ref) and torch.equal(h[0].demand, ref)
    s = mon.summary()["0"]
    assert s["load"] == pytest.approx((ref / 30).tolist()) and s["steps"] == 3
    assert s["entropy"] == pytest.approx(evenness(ref)["entropy"])
    table = mon.table()
    assert table.splitlines()[0].startswith("| layer | load per expert (%)") and len(table.splitlines()) == 4
    mon.plot(tmp_path / "util.png")
    assert (tmp_path / "util.png").read_bytes()[:4] == b"\x89PNG"


def test_dropped_fraction_and_dynamic_capacity_from_demand():
    net = model(RouterSpec("softmax_topk", 2, capacity_factor=0.5)).train()
    mon = Monitor(net)
    x = torch.randn(4, 6, 8)
    with mon.step():
        net(x)
    with torch.no_grad():   # the first layer sees x itself: its drops can be computed by hand
        ids = route(net[0].router_logits(x).reshape(24, 4), net[0].spec)[1]
    assert mon.series("0")[0].dropped == pytest.approx(dropped_fraction(ids)) and dropped_fraction(ids) > 0
    busiest = max(mon.summary()["0"]["demand"])
    factors = dynamic_capacity(net, mon, window=1)
    assert factors["0"] == pytest.approx(4 * busiest)                     # E · busiest share of T·k
    assert net[0].spec.router.capacity_factor == pytest.approx(4 * busiest)
    with mon.step():
        net(x)
    assert mon.series("0")[-1].dropped == 0.0                             # capacity = observed demand
    dynamic_capacity(net, mon, window=1, margin=0.5)
    with mon.step():
        net(x)
    assert mon.series("0")[-1].dropped > 0


def test_monitors_a_captured_graph_and_refuses_when_empty():
    net = model().eval()
    for i, m in enumerate(net):
        m.spec = m.spec.replace(name=f"moe{i}")
    c = capture(net, (torch.randn(2, 3, 8),), recognize=False)
    mon = Monitor()
    with pytest.raises(MoeccError, match="recorded nothing"):
        mon.summary()
    with mon.step():
        c.gm(torch.randn(2, 7, 8))
    assert mon.layers() == ["moe0", "moe1"] and mon.series("moe1")[0].tokens == 14
    assert mon.series("moe1")[0].demand is None                           # no training forward: kept load only
