"""backends/tvm/linear.py: every Linear of a lowered program (router, shared expert, a model's own layers)
runs on the experts' GEMM kernel, not on TVM's unscheduled matmul over a weight transposed per call
(issue 16: that made a DeepSeek-like layer 5-25x slower than torch); numerically the PyTorch model,
at token counts off the SIMD width, for 3-D inputs, with and without bias; other matmuls are left alone."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from moecc.backends.tvm import lower, runtime
from moecc.complex_real import complex_to_real
from moecc.decompose import decompose
from moecc.nn import MoE
from numerics import assert_numerically_equal
from tvm_cases import spec

H = 12     # not a multiple of the SIMD width


class Dense(nn.Module):
    """Linear (bias) → MoE (router Linear, gated shared expert) → Linear (no bias), on x [B, S, H]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(H, 20), nn.Linear(20, H, bias=False)
        self.moe = MoE(spec("dsk", E=8, H=20, F=6, act="swiglu", top_k=3, renormalize=False, shared_ffn=6,
                            shared_gated=True), init_std=20 ** -0.5)
        with torch.no_grad():
            self.out.weight.mul_(8)                      # an output well above the tolerance
        self.eval()

    def forward(self, x):
        return self.out(self.moe(self.inp(x)))


class Scores(nn.Module):
    """A matmul by a transposed activation of symbolic shape: not a Linear, must stay TVM's matmul."""

    def forward(self, q, k):
        return torch.softmax(q @ k.transpose(-1, -2), -1)


def export(model, *args):
    dims = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in args)
    return torch.export.export(model, args, dynamic_shapes=dims)


def ops_of(mod) -> dict:
    """{relax op name: count} over every Relax function of mod."""
    count = {}

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            count[e.op.name] = count.get(e.op.name, 0) + 1
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return count


def built(model, *args, tmp_path):
    program = complex_to_real(decompose(export(model, *args)))
    mod, *_ = lower.build(program, {}, lower.resolve_target("llvm"), None, tmp_path / "model.so")
    return mod


def test_no_linear_is_left_on_a_transposed_unscheduled_matmul(tmp_path):
    """The five Linears (inp, router, shared in/out, shared gate, out) are segment GEMM calls."""
    mod = built(Dense(), torch.randn(2, 5, H), tmp_path=tmp_path)
    ops = ops_of(mod)
    assert "relax.matmul" not in ops and "relax.permute_dims" not in ops, ops
    gemms = [gv.name_hint for gv, f in mod.functions.items() if gv.name_hint.startswith("linear_gemm")]
    assert len(gemms) >= 4, gemms      # one per distinct (R, K): inp, router, shared in, gate, out, ...


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 0)])
def test_linears_on_the_gemm_kernel_compute_the_model(tmp_path, shape):
    model = Dense()
    lower.lower(export(model, torch.randn(2, 5, H)), tmp_path, {"tokens": 10})
    x = torch.randn(*shape, H, generator=torch.Generator().manual_seed(sum(shape)))
    want = model(x).detach().numpy()
    got = runtime.load(tmp_path, {})([x.numpy()])[0]
    assert got.shape == want.shape
    if x.numel():
        assert np.abs(want).max() > 0.1
    assert_numerically_equal(got, want, atol=1e-5, rtol=1e-5, what=f"x {shape}")


def test_a_matmul_by_a_transposed_activation_stays_as_it_was(tmp_path):
    q, k = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    assert ops_of(built(Scores(), q, k, tmp_path=tmp_path)).get("relax.matmul") == 1
    lower.lower(export(Scores(), q, k), tmp_path, {})
    q, k = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    got = runtime.load(tmp_path, {})([q.numpy(), k.numpy()])[0]
    assert_numerically_equal(got, Scores()(q, k).numpy(), atol=1e-5, rtol=1e-5, what="q @ k.T")
