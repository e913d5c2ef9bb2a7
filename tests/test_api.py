"""The Python API: moecc.capture / transform / compile / load, and the light `import moecc`."""
import json
import subprocess
import sys
from functools import partial

import torch

import moecc
import perturbed_models
import tiny_gpt
from moecc.perturb import perturb_experts
from moecc.pipeline import moe_nodes
from numerics import assert_numerically_equal


def test_import_moecc_does_not_import_torch():
    code = "import sys, moecc, moecc.cli, moecc.run_artifact; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_capture_transform_compile_load(tmp_path):
    model, ex = tiny_gpt.build()
    captured = moecc.capture(model, ex)
    pm = moecc.transform(captured, [("upcycle", {"num_experts": 4, "top_k": 1, "layers": "0,2"})])
    assert [r.name for r in pm.records] == ["canonicalize", "upcycle"]
    assert len(list(moe_nodes(captured.gm))) == 2
    out = moecc.compile(model, ex, passes=[("upcycle", {"num_experts": 4, "top_k": 1})], backend="torch",
                        out=tmp_path / "a", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["ok"]          # identical experts: a perturbed twin was checked too
    assert [c["label"] for c in manifest["verification"]["checks"]] == ["example", "fresh", "perturbed"]


def test_compile_and_load_match_the_captured_graph_where_routing_matters(tmp_path):
    """An upcycled model with its experts perturbed (each differs, the router decides): the loaded torch
    artifact equals the captured PyTorch graph at another token count (against the dense model, an
    upcycled one matches whatever the routing). test_routing_matters.py does the same for every backend
    through the CLI."""
    gm, ex = perturbed_models.upcycled(partial(tiny_gpt.build, dim=32, layers=2, ffn=48), experts=4, top_k=2)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = gm(tokens)
        assert (want - perturb_experts(gm, seed=1)(tokens)).abs().max() > 1e-2    # routing matters here
    out = moecc.compile(gm, ex, backend="torch", out=tmp_path / "a", progress=False)
    assert json.loads((out / "manifest.json").read_text())["verification"]["ok"]
    assert_numerically_equal(moecc.load(out).module()(tokens), want, atol=1e-5, what="torch artifact vs captured graph")


class ExpertsLevel(torch.nn.Module):
    """A layer captured at the experts level (as transformers' experts interface is): routing as
    ordinary ops in the model, one moecc::experts node, no moe node."""

    def __init__(self):
        super().__init__()
        from moecc.spec import MoESpec, RouterSpec
        torch.manual_seed(0)
        self.spec = MoESpec(4, 8, 6, "swiglu", RouterSpec(top_k=2), name="block.experts")
        self.router = torch.nn.Linear(8, 4, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(4, 12, 8) * 0.5)
        self.w_out = torch.nn.Parameter(torch.randn(4, 8, 6) * 0.5)

    def forward(self, x):
        from moecc.ops import call_experts
        from moecc.routing import route
        xt = x.reshape(-1, 8)                                                # [T, H]
        weights, ids = route(self.router(xt), self.spec)                    # [T, k]
        return call_experts(xt, ids, weights, self.w_in, self.w_out, self.spec).reshape(x.shape)


def test_experts_level_layers_compile_to_torch_and_onnx(tmp_path):
    model, ex = ExpertsLevel().eval(), (torch.randn(2, 5, 8),)
    for backend in ("torch", "onnx"):
        out = moecc.compile(model, ex, backend=backend, out=tmp_path / backend, progress=False)
        m = json.loads((out / "manifest.json").read_text())
        assert m["verification"]["ok"]
        assert [layer["name"] for layer in m["layers"]] == ["block.experts"]
        kernel = m["backend"]["kernels"][0]["kernel"]
        assert kernel.startswith("torch.auto@") if backend == "torch" else kernel.startswith("onnx.")
