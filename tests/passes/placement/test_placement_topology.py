"""Topology strings and files."""
import json

import pytest

from moecc.errors import MoeccError
from moecc.passes.placement.topology import Topology, check_fits, parse_topology


def test_spec_string():
    t = parse_topology("2x4:slots=10,intra=300,inter=25")
    assert t == Topology(2, 4, 10, 300.0, 25.0)
    assert (t.devices, t.total_slots, t.node_of(5)) == (8, 80, 1)
    assert parse_topology(str(t)) == t
    assert parse_topology("1x8:slots=3").inter_gbps == 25.0


def test_json_file(tmp_path):
    path = tmp_path / "topo.json"
    path.write_text(json.dumps({"nodes": 4, "devices_per_node": 8, "slots": 9, "inter_gbps": 50}))
    assert parse_topology(str(path)) == Topology(4, 8, 9, 300.0, 50.0)
    path.write_text(json.dumps({"nodes": 4, "gpus": 8, "slots": 9}))
    with pytest.raises(MoeccError, match=r"unknown keys \['gpus'\] / lacks \['devices_per_node'\]"):
        parse_topology(str(path))


@pytest.mark.parametrize("text, message", [
    ("2x4", "does not say slots=S"),
    ("2x4:slots=10,speed=3", "unknown or empty setting 'speed=3'"),
    ("2x4:slots=ten", "slots='ten'"),
    ("2x0:slots=4", "devices_per_node must be a positive integer, got 0"),
    ("2x4:slots=2.5", "slots must be a positive integer, got 2.5"),
    ("2x4:slots=4,inter=0", "inter_gbps must be > 0"),
    ("eight gpus", "cannot parse 'eight gpus'"),
])
def test_bad_topologies(text, message):
    with pytest.raises(MoeccError, match=message):
        parse_topology(text)


def test_more_experts_than_slots_names_the_numbers():
    t = parse_topology("2x4:slots=8")
    check_fits(t, 60, 4)
    with pytest.raises(MoeccError, match=r"64 experts \+ 8 replicas = 72 exceed the 8 devices × 8 "
                                         r"slots = 64 slots"):
        check_fits(t, 64, 8)
