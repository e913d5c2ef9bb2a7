"""RouterSpec.capacity (fixed slots) + capacity_per_row (Switch Transformers: queues per sequence)."""
from __future__ import annotations

import torch

import moecc.ops  # noqa: F401
from moecc.ops import call_moe, record_routing
from moecc.routing import apply_capacity, route
from moecc.spec import MoESpec, RouterSpec


def _switch_keep(ids: torch.Tensor, E: int, cap: int) -> torch.Tensor:
    """transformers' SwitchTransformersTop1Router rule: cumsum of the one-hot over the sequence axis."""
    onehot = torch.nn.functional.one_hot(ids, E)                          # [B, S, E]
    return ((torch.cumsum(onehot, dim=-2) <= cap) * onehot).sum(-1) > 0   # [B, S]


def test_per_row_fixed_capacity_matches_switch_rule():
    B, S, E, cap = 3, 10, 4, 2
    spec = MoESpec(num_experts=E, hidden=8, ffn=8, activation="relu",
                   router=RouterSpec("softmax_topk", top_k=1, renormalize=False, capacity=cap, capacity_per_row=True))
    logits = torch.randn(B * S, E, generator=torch.Generator().manual_seed(0))
    weights, ids = route(logits, spec, rows=B)
    expected = _switch_keep(logits.argmax(-1).view(B, S), E, cap).view(-1)
    assert torch.equal(ids[:, 0] >= 0, expected)
    assert bool((~expected).any()), "the case must drop something"
    assert torch.equal(weights[:, 0] == 0, ~expected)
    # counted over the whole call instead (the default), more tokens are dropped: the field matters
    per_call = RouterSpec("softmax_topk", top_k=1, renormalize=False, capacity=cap)
    _, ids_global = route(logits, spec.replace(router=per_call), rows=B)
    assert int((ids_global < 0).sum()) > int((ids < 0).sum())


def test_rows_one_is_the_old_global_rule():
    spec = MoESpec(num_experts=4, hidden=8, ffn=8, router=RouterSpec(top_k=2, capacity_factor=0.5,
                                                                     capacity_per_row=True))
    w = torch.rand(12, 2)
    ids = torch.randint(0, 4, (12, 2), generator=torch.Generator().manual_seed(1))
    a = apply_capacity(w, ids, spec, rows=1)
    b = apply_capacity(w, ids, spec.replace(router=RouterSpec(top_k=2, capacity_factor=0.5)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_op_counts_capacity_per_sequence_of_x():
    B, S, H, E = 2, 6, 8, 4
    spec = MoESpec(num_experts=E, hidden=H, ffn=16, activation="relu",
                   router=RouterSpec("softmax_topk", top_k=1, renormalize=False, capacity=1, capacity_per_row=True))
    gen = torch.Generator().manual_seed(2)
    x, logits = torch.randn(B, S, H, generator=gen), torch.randn(B, S, E, generator=gen)
    w_in, w_out = torch.randn(E, 16, H, generator=gen), torch.randn(E, H, 16, generator=gen)
    with record_routing() as rec:
        y = call_moe(x, logits, w_in, w_out, spec)
    kept = rec[0]["expert_ids"][:, 0] >= 0
    assert torch.equal(kept, _switch_keep(logits.argmax(-1), E, 1).view(-1))
    # each sequence alone gives the same rows: capacity does not leak across the batch
    for b in range(B):
        torch.testing.assert_close(y[b], call_moe(x[b:b + 1], logits[b:b + 1], w_in, w_out, spec)[0])


def test_spec_json_round_trip_keeps_capacity_fields():
    spec = MoESpec(num_experts=4, hidden=8, ffn=8, router=RouterSpec(capacity=3, capacity_per_row=True))
    assert MoESpec.from_json(spec.to_json()) == spec
    assert MoESpec.from_dict({"num_experts": 4, "hidden": 8, "ffn": 8}).router.capacity == 0   # old JSON
