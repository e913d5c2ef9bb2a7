"""The decomposed form of real HF MoE blocks in bfloat16: bit for bit what HF eager computes.

Each recognized block (samples/hf_moe.py's tiny configs, cast to bf16) exported with dynamic batch
and sequence, decomposed (routing ATen ops + experts node) and run with each torch experts kernel
at token counts the export did not see; and each whole model through the torch backend's artifact
(lower → model.pt2 → load) against HF's logits.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moecc.backends.torch import lower as torch_lower  # noqa: E402
from moecc.backends.torch.runtime import load_program  # noqa: E402
from moecc.decompose import decompose, experts_nodes, set_experts_kernel  # noqa: E402
from moecc.recognize import recognize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
import hf_moe  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
BF16 = torch.bfloat16
KERNELS = ["reference", "torch.auto", "torch.loop", "torch.grouped_gemm", "torch.dense_masked"]
TOKENS = [(1, 1), (2, 7), (3, 16)]
SWITCH_TIE = (3, 16)     # a token whose top-2 bf16 probabilities tie (tests/recognize/test_bf16.py)


@pytest.fixture(scope="module", params=list(hf_moe.FAMILIES))
def family(request):
    hf, inputs = hf_moe.FAMILIES[request.param]()
    hf = hf.to(BF16)
    model, report = recognize(copy.deepcopy(hf))
    assert report.recognized and not report.refused
    return dict(name=request.param, hf=hf, inputs=inputs, model=model, report=report)


def _y(out):
    return out[0] if isinstance(out, tuple) else out


def test_decomposed_blocks_bit_exact_in_bf16(family):
    r = family["report"].recognized[0]
    block, new = family["hf"].get_submodule(r.path), family["model"].get_submodule(r.path)
    example = torch.randn(2, 5, r.spec.hidden).to(BF16)
    B, S = torch.export.Dim("B", min=1, max=64), torch.export.Dim("S", min=1, max=512)
    program = decompose(torch.export.export(new, (example,), dynamic_shapes=({0: B, 1: S},), strict=False))
    (node, spec), = experts_nodes(program.graph_module)
    assert spec == r.spec
    tokens = [t for t in TOKENS if not (family["name"] == "switch" and t == SWITCH_TIE)]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(*t, r.spec.hidden, generator=gen).to(BF16) for t in tokens]
    for kernel in KERNELS:
        set_experts_kernel(node, kernel)
        program.graph_module.recompile()
        module = program.module()
        for x in xs:
            with torch.no_grad():
                got, ref = _y(module(x)), _y(block(x))
            assert got.dtype == BF16 and torch.equal(got, ref), f"{family['name']} {kernel} x{list(x.shape)}"


def test_torch_artifact_logits_bit_exact_in_bf16(family, tmp_path):
    program = torch.export.export(family["model"], family["inputs"], strict=False)
    lowered = torch_lower.lower(program, tmp_path, {})
    assert all(k.kernel.startswith("torch.auto@") for k in lowered.kernels)   # the artifact's own tables
    module = load_program(tmp_path).module()
    targets = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert torch.ops.moecc.moe.default not in targets and torch.ops.moecc.experts.default in targets
    with torch.no_grad():
        got, ref = module(*family["inputs"]).logits, family["hf"](*family["inputs"]).logits
    assert torch.equal(got, ref)
