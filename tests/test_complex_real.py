"""moecc.complex_real: complex rotary arithmetic as real pairs, checked on the ONNX and TVM backends
against eager torch at token counts the export did not see; other complex ops are refused by name."""
import numpy as np
import pytest
import torch
from torch.export import Dim, export

from moecc import backends
from moecc.complex_real import complex_to_real, is_complex
from moecc.errors import MoeccError
from numerics import assert_numerically_equal


class Rotary(torch.nn.Module):
    """DeepSeek-V2's rotary: polar, view_as_complex, complex × complex, × real, view_as_real."""

    def forward(self, x):                                                      # [B, S, 8]
        S = x.shape[1]
        freqs = torch.outer(torch.arange(S, dtype=torch.float32), torch.linspace(0.1, 1.0, 4))   # [S, 4]
        cis = torch.polar(torch.ones_like(freqs) * 1.5, freqs)                   # [S, 4] complex
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], 4, 2))               # [B, S, 4] complex
        y = xc * cis.to(x.device).unsqueeze(0) * x[..., :4]                      # complex·complex·real
        return torch.view_as_real(y).flatten(-2) + x


class Conj(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], 4, 2)).conj_physical()).flatten(-2)


def program(model):
    return export(model, (torch.randn(2, 6, 8),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))


def test_no_complex_value_is_left_and_the_program_is_not_changed_in_place():
    ep = program(Rotary())
    out = complex_to_real(ep)
    assert not any(is_complex(n) for n in out.graph.nodes)
    assert any(is_complex(n) for n in ep.graph.nodes)
    x = torch.randn(1, 5, 8)
    assert_numerically_equal(out.module()(x), Rotary()(x), atol=1e-6, what="rewritten program")


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_rotary_through_backends(tmp_path, backend):
    model = Rotary()
    backends.get(backend).lower(program(model), tmp_path, {})
    run = backends.runtime(backend).load(tmp_path, {"backend": {"name": backend}})
    for S in (1, 11):
        x = torch.randn(3, S, 8, generator=torch.Generator().manual_seed(S))
        assert_numerically_equal(np.asarray(run([x.numpy()])[0]), model(x).numpy(), atol=1e-5, what=f"S={S}")


def test_other_complex_ops_are_refused_by_name():
    with pytest.raises(MoeccError, match=r"node 'conj_physical' \(aten\.conj_physical.*complex values.*--to torch"):
        complex_to_real(program(Conj()))
