"""moecc.decompose: moe node ⇒ routing as ATen ops + one experts node, exact and dynamic in T."""
import pytest
import torch
from torch.export import Dim

from moecc.decompose import ALWAYS, EXPERTS_OP, decompose, experts_nodes
from moecc.nn import MoE
from moecc.ops import record_routing
from moecc.pipeline import MOE_OP, SPEC_KEY
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal

ROUTERS = {
    "softmax": RouterSpec(top_k=2),
    "softmax_groups": RouterSpec(top_k=2, n_groups=2, topk_groups=1, renormalize=False),
    "topk_softmax": RouterSpec("topk_softmax", top_k=2),
    "sigmoid_groups_bias": RouterSpec("sigmoid_topk", top_k=2, n_groups=2, topk_groups=1, scaling=2.5),
    "expert_choice": RouterSpec("expert_choice", top_k=2),
    "hash": RouterSpec("hash", top_k=2),
    "hierarchical": RouterSpec("hierarchical", top_k=2, n_groups=2, topk_groups=1),
    "topk_unit": RouterSpec("topk_unit", top_k=2),
    "capacity_factor": RouterSpec(top_k=2, capacity_factor=0.75),
    "capacity_fixed": RouterSpec(top_k=1, capacity=2),
    "capacity_per_row": RouterSpec(top_k=1, capacity_factor=1.0, capacity_per_row=True),
}
TOKENS = [(1, 1), (3, 7), (1, 6), (2, 5)]      # (batch, sequence); the export example is (2, 5)


class WithIds(torch.nn.Module):
    """x and token ids into one MoE (hash routing reads the ids)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x, ids):
        return self.moe(x, ids)


def _model(router: RouterSpec, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    spec = MoESpec(4, 16, 24, "swiglu", router, name="layers.0.moe", **kw)
    m = MoE(spec, init_std=0.3).eval()
    if m.correction_bias is not None:
        m.correction_bias.data = torch.randn(4)                      # choosing bias that matters
    return WithIds(m).to(dtype)


def _export(model, dtype=torch.float32):
    B, S = Dim("B", min=1, max=64), Dim("S", min=1, max=512)
    example = (torch.randn(2, 5, 16, dtype=dtype), torch.randint(0, 1000, (2, 5)))
    return torch.export.export(model, example, dynamic_shapes=({0: B, 1: S}, {0: B, 1: S}))


def _check_tokens(model, module, dtype=torch.float32, exact=True):
    g = torch.Generator().manual_seed(1)
    for b, s in TOKENS:
        x = torch.randn(b, s, 16, generator=g).to(dtype)
        ids = torch.randint(0, 1000, (b, s), generator=g)
        with torch.no_grad():
            want, got = model(x, ids), module(x, ids)
        if exact:
            assert torch.equal(got, want), f"T={b * s}: max abs {(got - want).abs().max()}"
        else:
            assert_numerically_equal(got, want, atol=1e-6)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_router_decomposes_exactly_at_other_token_counts(name):
    model = _model(ROUTERS[name], shared_ffn=8)
    program = decompose(_export(model))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls].count(EXPERTS_OP) == 1
    assert MOE_OP not in [n.target for n in calls]
    (node, spec), = experts_nodes(program.graph_module)
    assert node.meta[SPEC_KEY] == spec and spec.name == "layers.0.moe" and spec.router == ROUTERS[name]
    _check_tokens(model, program.module())


def test_bf16_fp32_router_and_gated_shared_expert_bit_exact():
    model = _model(RouterSpec("sigmoid_topk", top_k=2, fp32=True), torch.bfloat16, shared_ffn=8,
                   shared_gated=True, combine="weight_fp32")
    program = decompose(_export(model, torch.bfloat16), )
    _check_tokens(model, program.module(), torch.bfloat16)


def test_a_wrong_router_in_the_decomposition_is_seen():
    """The check above can fail: the same model routed by another router differs."""
    model = _model(ROUTERS["softmax"])
    other = _model(RouterSpec("topk_unit", top_k=2))
    program = decompose(_export(other))
    x, ids = torch.randn(3, 7, 16), torch.randint(0, 1000, (3, 7))
    with torch.no_grad():
        assert not torch.equal(program.module()(x, ids), model(x, ids))


def test_record_routing_sees_decomposed_layers_by_name():
    model = _model(ROUTERS["capacity_factor"])
    module = decompose(_export(model)).module()
    x, ids = torch.randn(3, 7, 16), torch.randint(0, 1000, (3, 7))
    with torch.no_grad(), record_routing() as mine:
        module(x, ids)
    with torch.no_grad(), record_routing() as theirs:
        model(x, ids)
    assert [r["layer"] for r in mine] == ["layers.0.moe"]
    assert torch.equal(mine[0]["expert_ids"], theirs[0]["expert_ids"])
    assert torch.equal(mine[0]["weights"], theirs[0]["weights"])
    assert (mine[0]["expert_ids"] == -1).any()                       # capacity dropped some


def test_keep_always_leaves_the_moe_node():
    model = _model(ROUTERS["softmax"])
    program = decompose(_export(model), keep=lambda spec: ALWAYS)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(MOE_OP) == 1 and EXPERTS_OP not in targets
    _check_tokens(model, program.module())


def test_keep_below_dispatches_on_the_token_count():
    model = _model(ROUTERS["softmax"])
    program = decompose(_export(model), keep=lambda spec: 4)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.higher_order.cond in targets
    inner = {n.target for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
             for n in m.graph.nodes}
    assert MOE_OP in inner and EXPERTS_OP in inner
    kept = [n for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.target is MOE_OP]
    assert kept[0].args[-1] == "reference" and kept[0].meta[SPEC_KEY].name == "layers.0.moe"
    _check_tokens(model, program.module())


def test_program_without_moe_is_returned_as_is():
    lin = torch.nn.Linear(4, 4)
    program = torch.export.export(lin, (torch.randn(2, 4),))
    assert decompose(program) is program


class Two(torch.nn.Module):
    """Two layers whose specs differ in their ints (top_k): each cond branch keeps its own constants."""

    def __init__(self):
        super().__init__()
        self.a = _model(RouterSpec(top_k=2)).moe
        self.b = _model(RouterSpec(top_k=1)).moe

    def forward(self, x, ids):
        return self.b(torch.relu(self.a(x)))


def test_keep_below_with_layers_of_different_top_k():
    model = Two().eval()
    program = decompose(_export(model), keep=lambda spec: 4)
    conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 2 and all(len(n.args[3]) == 4 for n in conds)     # x, logits, w_in, w_out only
    _check_tokens(model, program.module())
