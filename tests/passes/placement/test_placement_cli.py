"""`moecc plan` and `moecc trace` end to end: files written, tables printed, one-line errors."""
import json
import re

import pytest
import torch

from moecc.cli import main
from moecc.passes.placement import load_plan, load_trace, save_trace
from moecc.passes.placement.synthetic import synthetic_trace

TINY_MOE = '''
import torch
from torch import nn
from moecc.nn import MoE
from moecc.spec import MoESpec, RouterSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MoE(MoESpec(8, 16, 32, router=RouterSpec(top_k=2), name="blocks.0.moe"))
        self.b = MoE(MoESpec(8, 16, 32, router=RouterSpec(top_k=2), name="blocks.1.moe"))

    def forward(self, x):
        return self.b(x + self.a(x))


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 8, 16),)
'''


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.npz"
    save_trace(synthetic_trace(layers=4, experts=32, top_k=4, tokens=400, windows=2, topics=8,
                               affinity=4.0, seed=0), path)
    return path


def test_plan_writes_placement_json(tmp_path, trace_file, capsys):
    out = tmp_path / "placement.json"
    assert main(["plan", "--trace", str(trace_file), "--topology", "2x4:slots=5", "--replicas", "8",
                 "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["format"] == "moecc.placement/1" and doc["method"] == "graph"
    assert len(doc["layers"]) == 4 and len(doc["layers"][0]["devices"]) == 8
    p = load_plan(out)
    assert p.share.shape == (4, 32, 8) and p.replicas <= 8


def test_plan_compare_prints_a_table_and_plots(tmp_path, trace_file, capsys):
    png = tmp_path / "load.png"
    assert main(["plan", "--trace", str(trace_file), "--topology", "2x4:slots=5", "--replicas", "8",
                 "--compare", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for method in ("contiguous", "round_robin", "eplb", "graph"):
        assert f"| {method} |" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--topology", "2x4:slots=3", "--out", "x.json"], r"32 experts \+ 0 replicas = 32 exceed the 8 "
                                                        "devices × 3 slots = 24 slots"),
    (["--topology", "2x4:slots=5", "--method", "eplb", "--replicas", "3", "--out", "x.json"],
     r"experts \+ replicas \(32 \+ 3 = 35\) must be a multiple of the 8 devices"),
    (["--topology", "2x4:slots=5"], "say --out placement.json, --compare, or both"),
    (["--topology", "2x4", "--out", "x.json"], "does not say slots=S"),
])
def test_plan_errors_are_one_line(tmp_path, trace_file, capsys, args, message):
    assert main(["plan", "--trace", str(trace_file)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and "\n" not in err
    assert re.search(message, err)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trace_then_plan_against_the_model(tmp_path, capsys):
    (tmp_path / "tiny_moe.py").write_text(TINY_MOE)
    torch.save(torch.randn(6, 8, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "x.pt")
    model, out = f"{tmp_path / 'tiny_moe.py'}:build", tmp_path / "trace.json"
    assert main(["trace", model, "--calibration", str(tmp_path / "x.pt"), "--out", str(out)]) == 0
    t = load_trace(out)
    assert (t.num_layers, t.num_experts, t.top_k, t.num_tokens, t.windows()) == (2, 8, 2, 48, [0, 1])
    assert t.layers == ("blocks.0.moe", "blocks.1.moe")
    args = ["plan", "--trace", str(out), "--topology", "1x4:slots=3", "--replicas", "4"]
    assert main(args + ["--model", model, "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    other = TINY_MOE.replace("MoESpec(8, 16, 32, router=RouterSpec(top_k=2), name=\"blocks.1.moe\")",
                             "MoESpec(8, 16, 32, router=RouterSpec(top_k=2), name=\"blocks.1.moe\")"
                             ")\n        self.c = MoE(MoESpec(8, 16, 32, name=\"c\")")
    other = other.replace("return self.b(x + self.a(x))", "return self.c(self.b(x + self.a(x)))")
    (tmp_path / "bigger.py").write_text(other)
    assert main(args + ["--model", f"{tmp_path / 'bigger.py'}:build", "--out", "p.json"]) == 2
    assert "trace has 2 MoE layers but the model has 3" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trace_a_torch_artifact_as_its_factory(tmp_path, capsys):
    """`moecc trace ARTIFACT` (the README's placement flow): a torch artifact holds the decomposed
    program (experts nodes, no moe node); its trace is the factory's, id for id."""
    (tmp_path / "tiny_moe.py").write_text(TINY_MOE)
    torch.save(torch.randn(6, 8, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "x.pt")
    model, art = f"{tmp_path / 'tiny_moe.py'}:build", tmp_path / "art"
    assert main(["compile", model, "--to", "torch", "--out", str(art)]) == 0
    for ref, out in ((model, "f.npz"), (str(art), "a.npz")):
        assert main(["trace", ref, "--calibration", str(tmp_path / "x.pt"), "--out", str(tmp_path / out)]) == 0
    f, a = load_trace(tmp_path / "f.npz"), load_trace(tmp_path / "a.npz")
    assert a.layers == f.layers == ("blocks.0.moe", "blocks.1.moe")
    assert (a.expert_ids == f.expert_ids).all() and a.expert_ids.shape == (2, 48, 2)
    torch.testing.assert_close(torch.as_tensor(a.weights), torch.as_tensor(f.weights))
