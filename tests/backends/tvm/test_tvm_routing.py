"""Routing through TVM is moecc.routing itself: routers written only in moecc/routing.py, exported as
ATen ops and imported by TVM's own PyTorch importer (backends/tvm/importer.py adds generic ATen
translations only), match moecc.routing.route for every router family, from ONE compiled library,
at token counts other than the example's (T = 1 included); and whole MoE layers of each family (routing
→ the experts kernel chosen by cost) match moe_reference."""
import numpy as np
import pytest
import torch
from torch import nn

from moecc.backends.tvm import lower, runtime
from moecc.nn import MoE
from moecc.routing import logits_width, route
from moecc.spec import MoESpec, RouterSpec
from numerics import assert_numerically_equal

E, H = 8, 16
CASES = {
    "softmax_topk": RouterSpec("softmax_topk", top_k=2),
    "softmax_topk_raw_scaled": RouterSpec("softmax_topk", top_k=3, renormalize=False, scaling=2.5),
    "softmax_topk_groups_max": RouterSpec("softmax_topk", top_k=2, n_groups=4, topk_groups=2, group_score="max"),
    "topk_softmax": RouterSpec("topk_softmax", top_k=2),
    "sigmoid_groups": RouterSpec("sigmoid_topk", top_k=3, n_groups=4, topk_groups=2, scaling=2.5),
    "sigmoid_raw": RouterSpec("sigmoid_topk", top_k=2, renormalize=False),
    "hierarchical": RouterSpec("hierarchical", top_k=2, n_groups=2, topk_groups=1),
    "expert_choice": RouterSpec("expert_choice", top_k=2),
    "expert_choice_cf": RouterSpec("expert_choice", top_k=2, capacity_factor=1.5, scaling=0.5),
    "hash": RouterSpec("hash", top_k=2),
    "capacity_factor": RouterSpec("softmax_topk", top_k=2, capacity_factor=0.75),
    "capacity_fixed": RouterSpec("topk_softmax", top_k=2, capacity=2),
    "capacity_per_row": RouterSpec("softmax_topk", top_k=2, capacity_factor=1.0, capacity_per_row=True),
    "topk_unit": RouterSpec("topk_unit", top_k=3, renormalize=False),
}


def spec(name: str) -> MoESpec:
    return MoESpec(E, H, 16, "gelu", CASES[name], name=name)


class Routers(nn.Module):
    """x [B, S, H], token ids [B, S] -> (weights, ids) of every router in CASES, each with its own
    router Linear: routing only, as moecc.decompose leaves it in a graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gates = nn.ModuleDict({n: nn.Linear(H, logits_width(spec(n)), bias=False) for n in CASES})
        self.bias = nn.Parameter(torch.randn(E) * 0.3)

    def logits(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.gates[name](x.reshape(-1, H)) * 4                   # [T, L], wide enough to matter

    def forward(self, x, token_ids):
        outs = []
        for name in CASES:
            s = spec(name)
            bias = self.bias if s.router.kind == "sigmoid_topk" else None
            outs += route(self.logits(name, x), s, bias, token_ids.reshape(-1), x.shape[0])
        return tuple(outs)


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    model = Routers().eval()
    out = tmp_path_factory.mktemp("tvm_routers")
    dims = {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=4096)}
    ep = torch.export.export(model, (torch.randn(2, 6, H), torch.randint(0, 100, (2, 6))),
                             dynamic_shapes=(dims, dims))
    lower.lower(ep, out, {})
    return model, runtime.load(out, {})


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (2, 12)])
def test_every_router_matches_moecc_routing(routers, shape):
    model, run = routers
    g = torch.Generator().manual_seed(sum(shape))
    x, tok = torch.randn(*shape, H, generator=g), torch.randint(0, 50000, shape, generator=g)
    got = run([x.numpy(), tok.numpy()])
    with torch.no_grad():
        want = model(x, tok)
    assert len(got) == len(want) == 2 * len(CASES)
    for i, name in enumerate(CASES):
        (w, ids), (w_ref, ids_ref) = got[2 * i:2 * i + 2], want[2 * i:2 * i + 2]
        np.testing.assert_array_equal(ids, ids_ref.numpy(), err_msg=f"{name}: expert ids differ")
        np.testing.assert_allclose(w, w_ref.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name}: weights differ")


def test_capacity_cases_drop_something(routers):
    """The capacity routers are exercised where they matter: some slots are dropped (id -1)."""
    _, run = routers
    x = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(0))
    got = run([x.numpy(), np.zeros((2, 12), dtype=np.int64)])
    for name in ("capacity_factor", "capacity_fixed", "capacity_per_row", "expert_choice"):
        ids = got[2 * list(CASES).index(name) + 1]
        assert (ids < 0).any() and (ids >= 0).any(), name


LAYERS = ("softmax_topk_groups_max", "sigmoid_groups", "hierarchical", "expert_choice_cf", "capacity_factor",
          "capacity_per_row", "topk_unit")


class Stack(nn.Module):
    """MoE layers of several router families in a row (the residual keeps each visible)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(MoE(spec(n), init_std=H ** -0.5) for n in LAYERS)
        with torch.no_grad():
            for m in self.layers:
                if m.correction_bias is not None:
                    m.correction_bias.copy_(torch.randn(E) * 0.1)
        self.eval()

    def forward(self, x):
        for m in self.layers:
            x = x + m(x)
        return x


def test_moe_layers_of_every_family_match_the_reference(tmp_path):
    model = Stack()
    dims = {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=4096)}
    ep = torch.export.export(model, (torch.randn(2, 6, H),), dynamic_shapes=(dims,))
    low = lower.lower(ep, tmp_path, {})
    assert [k.layer for k in low.kernels] == list(LAYERS)
    run = runtime.load(tmp_path, {})
    for shape in [(1, 1), (3, 10)]:
        x = torch.randn(*shape, H, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            want = model(x).numpy()
        assert_numerically_equal(run([x.numpy()])[0], want, atol=1e-5, rtol=1e-5, what=f"x {shape}")


HALF = {"sigmoid_fp32": RouterSpec("sigmoid_topk", top_k=3, n_groups=4, topk_groups=2, scaling=2.5),
        "softmax_half": RouterSpec("softmax_topk", top_k=2, fp32=False),
        "expert_choice_half": RouterSpec("expert_choice", top_k=2, fp32=False),
        "capacity_fp32": RouterSpec("softmax_topk", top_k=2, capacity_factor=0.75)}


class Parallel(nn.Module):
    """One MoE layer per HALF router on the same x, each output returned (errors do not compound)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(2)
        self.layers = nn.ModuleList(MoE(MoESpec(E, H, 16, "swiglu", r, name=n), init_std=0.25)
                                    for n, r in HALF.items())
        with torch.no_grad():
            self.layers[0].correction_bias.copy_(torch.randn(E) * 0.1)
        self.eval().to(dtype)

    def forward(self, x):
        return tuple(m(x) for m in self.layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_routers(tmp_path, dtype):
    """float16/bfloat16 models, routers in float32 (fp32) or in the model's dtype: TVM's output is the
    reference's within 2 ulp of its largest value (bfloat16 top-k runs in float32: TVM 0.27's own
    orders bfloat16 wrongly, which routed most tokens to other experts)."""
    import ml_dtypes
    model = Parallel(dtype)
    dims = {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=4096)}
    lower.lower(torch.export.export(model, (torch.randn(2, 5, H, dtype=dtype),), dynamic_shapes=(dims,)),
                tmp_path, {})
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(3)).to(dtype) * 2
    feed = x.numpy() if dtype == torch.float16 else x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    got = runtime.load(tmp_path)([feed])
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    with torch.no_grad():
        for name, g, w in zip(HALF, got, model(x)):
            want = w.float().numpy()
            assert_numerically_equal(g.astype(np.float32), want, atol=2 * ulp * np.abs(want).max(), rtol=0,
                                     what=f"{name} {dtype}")


class GroupMask(nn.Module):
    """A model's own router code (transformers' DeepSeek-style group limit) with topk(sorted=False),
    which TVM 0.27's importer refuses: the group order does not matter, only the mask."""

    def forward(self, logits):                                            # [T, 8]
        scores = logits.sigmoid()
        groups = scores.view(-1, 4, 2).amax(-1)                           # [T, 4]
        picked = torch.topk(groups, k=2, dim=-1, sorted=False)[1]         # [T, 2] groups, any order
        mask = torch.zeros_like(groups).scatter(1, picked, 1.0)           # [T, 4]
        keep = mask.unsqueeze(-1).expand(-1, 4, 2).reshape(-1, 8)
        return torch.topk(scores.masked_fill(keep == 0, 0.0), k=3, dim=-1)[1]


def test_unsorted_topk_in_a_models_own_router(tmp_path):
    ep = torch.export.export(GroupMask(), (torch.randn(5, 8),),
                             dynamic_shapes=({0: torch.export.Dim("t", max=4096)},))
    lower.lower(ep, tmp_path, {})
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(runtime.load(tmp_path)([x.numpy()])[0], GroupMask()(x).numpy())
