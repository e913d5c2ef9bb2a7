"""The Relax router math (backends/tvm/routing.py) against moecc.routing.route, every router family,
at several token counts, from ONE compiled module (a function per router configuration)."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from moecc.backends.tvm.routing import route
from moecc.routing import logits_width
from moecc.routing import route as reference_route
from moecc.spec import MoESpec, RouterSpec

E = 8
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
ROWS = 2          # capacity_per_row functions take logits [ROWS, S, L]


def spec(name: str) -> MoESpec:
    return MoESpec(E, 16, 16, "gelu", CASES[name], name=name)


def build(bb: relax.BlockBuilder, name: str) -> None:
    s = spec(name)
    T, S = tirx.Var("t", "int64"), tirx.Var("s", "int64")
    L = logits_width(s)
    per_row = s.router.capacity_per_row
    logits = relax.Var("logits", relax.TensorType((ROWS, S, L) if per_row else (T, L), "float32"))
    bias = relax.Var("bias", relax.TensorType((E,), "float32"))
    tokens = relax.Var("tokens", relax.TensorType((T,), "int64"))
    params = [logits] + ([bias] if s.router.kind == "sigmoid_topk" else []) + \
        ([tokens] if s.router.kind == "hash" else [])
    with bb.function(name, params):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(logits, (ROWS * S, L))) if per_row else logits
            w, ids = route(bb, flat, s, bias if s.router.kind == "sigmoid_topk" else None,
                           tokens if s.router.kind == "hash" else None, (ROWS, S) if per_row else (1, T))
            out = bb.emit_output(relax.Tuple([w, ids]))
        bb.emit_func_output(out)


@pytest.fixture(scope="module")
def vm():
    bb = relax.BlockBuilder()
    for name in CASES:
        build(bb, name)
    return relax.VirtualMachine(tvm.compile(bb.get(), "llvm"), tvm.cpu())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tokens", [1, 6, 24])
def test_route_matches_reference(vm, name, tokens):
    s = spec(name)
    g = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, logits_width(s), generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.3
    token_ids = torch.randint(0, 50000, (tokens,), generator=g)
    args, rows = [logits.numpy()], 1
    if s.router.capacity_per_row:
        if tokens % ROWS:
            pytest.skip("per-row capacity: rows of equal length")
        args, rows = [logits.reshape(ROWS, tokens // ROWS, -1).numpy()], ROWS
    if s.router.kind == "sigmoid_topk":
        args.append(bias.numpy())
    if s.router.kind == "hash":
        args.append(token_ids.numpy())
    w_ref, ids_ref = reference_route(logits, s, bias if s.router.kind == "sigmoid_topk" else None,
                                     token_ids, rows)
    w, ids = (o.numpy() for o in vm[name](*[tvm.runtime.tensor(a) for a in args]))
    np.testing.assert_array_equal(ids, ids_ref.numpy(), err_msg=f"{name}: expert ids differ")
    np.testing.assert_allclose(w, w_ref.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{name}: weights differ")


def test_capacity_cases_drop_something(vm):
    """The capacity functions are exercised where they matter: some slots are dropped (id -1)."""
    logits = torch.randn(24, E, generator=torch.Generator().manual_seed(0)) * 2
    for name in ("capacity_factor", "capacity_fixed", "expert_choice"):
        ids = vm[name](tvm.runtime.tensor(logits.numpy()))[1].numpy()
        assert (ids < 0).any() and (ids >= 0).any(), name
