"""Capacity on a dynamic token count survives the torch artifact: torch.export.save serializes only
some symbolic ops (math.ceil of a SymFloat is not one), so the capacity is integer arithmetic on the
factor's fraction (routing.ceil_scaled); the README's `--router sigmoid-topk --capacity-factor 1.25`
compile."""
import io
import math
from fractions import Fraction

import pytest
import torch

from moecc.cli import main
from moecc.routing import expert_choice_capacity, token_capacity
from moecc.spec import MoESpec, RouterSpec

SPECS = [MoESpec(8, 16, 32, router=RouterSpec(top_k=2, capacity_factor=1.25)),
         MoESpec(6, 16, 32, router=RouterSpec(top_k=3, capacity_factor=0.7)),
         MoESpec(8, 16, 32, router=RouterSpec(kind="expert_choice", top_k=2))]


class Capacity(torch.nn.Module):
    def __init__(self, spec, fn):
        super().__init__()
        self.spec, self.fn = spec, fn

    def forward(self, x):
        return x.new_ones(()) * self.fn(x.shape[0], self.spec)           # the value, no size guard


@pytest.mark.parametrize("i", range(len(SPECS)))
def test_capacity_of_a_dynamic_token_count_saves_and_reloads(i):
    spec = SPECS[i]
    fn = expert_choice_capacity if spec.router.kind == "expert_choice" else token_capacity
    cf = Fraction(str(spec.router.capacity_factor or spec.top_k))               # 0.7 is 7/10
    program = torch.export.export(Capacity(spec, fn), (torch.zeros(10, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("T", min=1, max=4096)},))
    buf = io.BytesIO()
    torch.export.save(program, buf)                                   # raised before sym_ceil
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for T in (1, 2, 3, 7, 8, 16, 33, 100, 1000):                         # integral and fractional T·cf·k/E
        want = (min(T, max(1, math.ceil(cf * T / spec.num_experts))) if fn is expert_choice_capacity
                else max(1, math.ceil(cf * T * spec.top_k / spec.num_experts)))
        assert int(loaded(torch.zeros(T, 4))) == want == fn(T, spec), (T, spec.router)


def test_capacity_factor_is_the_decimal_the_user_wrote():
    """0.07 x 100 tokens x top-1 over 1 expert: 7 slots (the float product is 7.000000000000001)."""
    assert math.ceil(0.07 * 100) == 8
    assert token_capacity(100, MoESpec(1, 16, 32, router=RouterSpec(top_k=1, capacity_factor=0.07))) == 7
    assert token_capacity(7, MoESpec(8, 16, 32, router=RouterSpec(top_k=2, capacity_factor=1.25))) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_capacity_compile_to_torch(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["compile", "samples/tiny_gpt.py:build", "--upcycle", "8", "--router", "sigmoid-topk",
                 "--capacity-factor", "1.25", "--out", str(out)]) == 0
    assert (out / "model.pt2").is_file() and "wrote" in capsys.readouterr().out
