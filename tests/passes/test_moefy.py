"""moefy: dense FFN → MoE of disjoint neuron groups. Structure, exactness with all experts on (tiny BERT,
tiny SwiGLU GPT, the real MiniLM), partitions, routers, quality at half the experts, bad input."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from moecc import calibration as calib
from moecc.frontend import capture
from moecc.errors import MoeccError
from sample_loader import load_sample
from moecc.passes import make as make_pass
from moecc.passes import moefy, moefy_partition, moefy_refit, moefy_router
from moecc.passes.canonicalize import canonicalize
from moecc.passes.ffn_match import find_ffns
from moecc.pipeline import PassManager, moe_nodes

ROOT = Path(__file__).resolve().parents[2]


_sample = load_sample


def _captured(model, example):
    c = capture(model, example)
    canonicalize(c.gm)
    return c.gm


@pytest.fixture(scope="module")
def bert():
    model, example = _sample("tiny_bert").build()
    g = torch.Generator().manual_seed(1)
    cal = (torch.randint(0, 512, (24, 12), generator=g), torch.ones(24, 12, dtype=torch.long))
    return model, example, _captured(model, example), cal


@pytest.fixture(scope="module")
def gpt():
    model, example = _sample("tiny_gpt").build()
    g = torch.Generator().manual_seed(1)
    return model, example, _captured(model, example), (torch.randint(0, 256, (24, 16), generator=g),)


@pytest.fixture(scope="module")
def minilm():
    mod = _sample("minilm")
    model, example = mod.build()
    cal_lines, held = calib.split_corpus()
    return mod, model, _captured(model, example), cal_lines[:120], held[:40]


def _run(gm, plans, k, inputs):
    out = copy.deepcopy(gm)
    moefy.apply(out, plans, k)
    with torch.no_grad():
        return out, out(*inputs)


def test_structure_spec_and_stats(bert):
    model, example, gm, cal = bert
    gm = copy.deepcopy(gm)
    result = PassManager([("moefy", make_pass("moefy", {"num_experts": 4, "top_k": 2, "calibration": cal}))])
    gm = result(gm)
    nodes = list(moe_nodes(gm))
    assert len(nodes) == 3 and find_ffns(gm)[0] == []
    spec = nodes[0][1]
    assert (spec.num_experts, spec.top_k, spec.ffn, spec.hidden) == (4, 2, 64, 64)
    assert spec.router.kind == "topk_unit" and spec.expert_bias and spec.activation == "gelu"
    stats = result.records[0].stats
    assert stats == {"ffn_found": 3, "ffn_rewritten": 3, "refused": 0, "calibration_examples": 24,
                     "calibration_tokens": 288, "padded_neurons": 0, "shared_neurons": 0}
    assert all(isinstance(v, int) for v in stats.values())
    facts = moefy.moefy_facts(gm)
    assert sorted(facts) == ["layer.0", "layer.1", "layer.2"]
    f = facts["layer.0"]
    assert f["method"] == "cluster" and f["router"] == "linear" and f["active_fraction"] == 0.5
    assert f["calibration"]["tokens"] == 288 and len(f["calibration"]["sha256"]) == 64
    assert 0 < f["held_out_ffn_error"] < 1
    assert gm(*example).shape == model(*example).shape


@pytest.mark.parametrize("method,router,shared", [("cluster", "linear", 0), ("coactivation", "mlp", 40)])
def test_all_experts_on_equals_dense_bert(bert, method, router, shared):
    model, example, gm, cal = bert
    plans, _ = moefy.plan(gm, 8, method=method, router=router, shared=shared, calibration=cal)
    out, y = _run(gm, plans, 8, example)
    torch.testing.assert_close(y, model(*example), atol=1e-5, rtol=0)
    assert plans[0].shared == (2 if shared else 0)
    errors = [moefy.held_out_error(plans[0], k) for k in range(plans[0].shared + 1, 9)]
    assert errors[-1] < 1e-5 and errors[0] > errors[-2] > errors[-1]


def test_all_experts_on_equals_dense_swiglu_with_padding(gpt):
    model, example, gm, cal = gpt                                    # F = 172: E = 8 pads to 8 × 22
    plans, stats = moefy.plan(gm, 8, calibration=cal)
    assert stats["padded_neurons"] == 4 * (8 * 22 - 172)
    out, y = _run(gm, plans, 8, example)
    torch.testing.assert_close(y, model(*example), atol=1e-5, rtol=0)
    spec = next(moe_nodes(out))[1]
    assert spec.activation == "swiglu" and spec.ffn == 22 and spec.in_rows == 44
    fewer = _run(gm, plans, 4, example)[1]
    assert not torch.allclose(fewer, y, atol=1e-4)                    # k < E really drops experts


def test_all_experts_on_equals_dense_minilm(minilm):
    mod, model, gm, cal_lines, held = minilm
    plans, stats = moefy.plan(gm, 8, calibration=cal_lines, tokenize=mod.tokenize)
    inputs = mod.tokenize(held[:8])
    out, y = _run(gm, plans, 8, inputs)
    torch.testing.assert_close(y, model(*inputs), atol=1e-5, rtol=0)
    assert len(list(moe_nodes(out))) == 6 and stats["calibration_examples"] == 120
    # half the experts: the fitted routers keep the embeddings closer to dense than random routers
    dense = model(*inputs)
    cos = torch.nn.functional.cosine_similarity(_run(gm, plans, 4, inputs)[1], dense, dim=1)
    g = torch.Generator().manual_seed(0)
    rand = [copy.copy(p) for p in plans]
    for p in rand:
        p.router = {"weight": torch.randn(p.router["weight"].shape, generator=g), "bias": p.router["bias"] * 0}
    cos_rand = torch.nn.functional.cosine_similarity(_run(gm, rand, 4, inputs)[1], dense, dim=1)
    assert cos.mean() > 0.8 and cos.mean() > cos_rand.mean() + 0.02


def test_refit_brings_minilm_closer_to_dense(minilm):
    mod, model, gm, cal_lines, held = minilm
    plans, _ = moefy.plan(gm, 8, calibration=cal_lines, tokenize=mod.tokenize)
    for p in plans:     # held-out calibration tokens: the least-squares refit beats biases alone
        assert moefy.held_out_error(p, 2) < 0.95 * moefy.held_out_error(p, 2, refit=False)
    inputs = mod.tokenize(held)
    dense = model(*inputs)
    cos = {r: torch.nn.functional.cosine_similarity(
        moefy.apply(copy.deepcopy(gm), plans, 2, refit=r)(*inputs), dense, dim=1).mean() for r in (True, False)}
    assert cos[True] > cos[False] + 0.02
    facts = moefy.moefy_facts(moefy.apply(copy.deepcopy(gm), plans, 2, refit=False))
    assert {f["refit"] for f in facts.values()} == {"biases"}


def test_refit_folds_a_dropped_copy_into_a_kept_neuron():
    # neuron 3 (expert 1, never chosen) fires exactly like neuron 0 (expert 0, always chosen): the refit
    # moves its output into neuron 0's row and the error vanishes; biases alone cannot do that
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(400, 6, generator=g))
    a[:, 3] = a[:, 0]
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    chosen = torch.tensor([[1.0, 0.0]]).expand(400, 2)
    a[:, 4:] = 0.0                                     # the rest of expert 1 is silent
    w_out, b_out = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    fit, val = torch.arange(400) % 4 != 0, torch.arange(400) % 4 == 0
    w_a, d, facts = moefy_refit.refit(a, chosen, owner, w_out, b_out, fit, val)
    assert facts["val_error"] < 1e-2 < facts["val_error_bias_only"]
    torch.testing.assert_close(w_a[0], w_out[:, 0] + w_out[:, 3], atol=1e-2, rtol=0)
    y = a @ w_out.t() + b_out
    assert moefy_refit.rel_error(moefy_refit.predict(a, chosen, owner, w_a, d), y) == pytest.approx(facts["val_error"], abs=1e-2)


@pytest.mark.parametrize("method", moefy_partition.METHODS)
@pytest.mark.parametrize("n,groups", [(64, 4), (50, 8), (33, 3)])
def test_partitions_are_disjoint_cover_and_balanced(method, n, groups):
    g = torch.Generator().manual_seed(n)
    rows, active = torch.randn(n, 16, generator=g), torch.rand(200, n, generator=g)
    labels = moefy_partition.partition(method, groups, rows=rows, active=active, seed=0)
    parts = moefy_partition.groups_of(labels, groups)
    flat = torch.cat(parts)
    assert flat.numel() == n and torch.equal(flat.sort().values, torch.arange(n))
    assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
    assert torch.equal(labels, moefy_partition.partition(method, groups, rows=rows, active=active, seed=0))


def test_partitions_find_planted_groups():
    # neurons 0..15 fire together, 16..31 together; their weight rows point in two directions
    g = torch.Generator().manual_seed(0)
    on = (torch.rand(300, 1, generator=g) > 0.5).float()
    active = torch.cat([on.expand(300, 16), (1 - on).expand(300, 16)], 1) + 0.05 * torch.rand(300, 32, generator=g)
    rows = torch.cat([torch.tensor([1.0, 0]).expand(16, 2), torch.tensor([0, 1.0]).expand(16, 2)])
    rows = rows + 0.05 * torch.randn(32, 2, generator=g)
    truth = [set(range(16)), set(range(16, 32))]
    for method in moefy_partition.METHODS:
        labels = moefy_partition.partition(method, 2, rows=rows, active=active, seed=1)
        assert [set(p.tolist()) for p in moefy_partition.groups_of(labels, 2)] in (truth, truth[::-1])


@pytest.mark.parametrize("kind", moefy_router.ROUTERS)
def test_router_fit_beats_random(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 24, generator=g)
    y = torch.relu(x @ torch.randn(24, 6, generator=g)) + 0.1 * torch.rand(2000, 6, generator=g)
    fitted = moefy_router.fit(kind, x[:1600], y[:1600], seed=0)
    score = moefy_router.recall(moefy_router.predict(fitted, x[1600:]), y[1600:])
    assert score > moefy_router.random_recall(y[1600:]) + 0.1 and score > 0.9


def test_router_on_a_real_layer_beats_random(bert):
    _, _, gm, cal = bert
    plans, _ = moefy.plan(gm, 4, calibration=cal)
    assert all(p.facts["router_recall"] > p.facts["random_recall"] for p in plans)


def test_bad_input(bert, tmp_path):
    _, _, gm, cal = bert
    with pytest.raises(MoeccError, match="needs at least 2 experts"):
        moefy.plan(gm, 1, calibration=cal)
    with pytest.raises(MoeccError, match="--top-k must be between 1 and E=4"):
        moefy.moefy(copy.deepcopy(gm), 4, 5, calibration=cal)
    with pytest.raises(MoeccError, match="pass --calibration"):
        moefy.plan(gm, 4)
    with pytest.raises(MoeccError, match="not found"):
        moefy.plan(gm, 4, calibration=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoeccError, match="is empty"):
        moefy.plan(gm, 4, calibration=str(tmp_path / "empty.txt"))
    with pytest.raises(MoeccError, match=r"needs at least 1024 \(32 per expert\)"):
        moefy.plan(gm, 32, calibration=cal)
    with pytest.raises(MoeccError, match="--method 'spectral'"):
        moefy.plan(gm, 4, method="spectral", calibration=cal)
    with pytest.raises(MoeccError, match="--router 'tree'"):
        moefy.plan(gm, 4, router="tree", calibration=cal)
    with pytest.raises(MoeccError, match="leave at least one expert to route"):
        moefy.plan(gm, 4, shared=64 * 4, calibration=cal)
    plans, _ = moefy.plan(gm, 4, shared=10, calibration=cal)
    with pytest.raises(MoeccError, match="must exceed the 1 always-on"):
        moefy.apply(copy.deepcopy(gm), plans, 1)
    with pytest.raises(MoeccError, match="no dense FFN found"):
        moefy.plan(_captured(torch.nn.Linear(8, 8), (torch.randn(2, 8),)), 4, calibration=cal)


def test_topk_unit_router_weights_each_chosen_expert_one():
    from moecc.routing import route
    from moecc.spec import MoESpec, RouterSpec
    spec = MoESpec(num_experts=4, hidden=8, ffn=4, router=RouterSpec("topk_unit", 2, renormalize=False))
    weights, ids = route(torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 0.2, 0.1]]), spec)
    assert ids.tolist() == [[1, 3], [0, 2]] and torch.equal(weights, torch.ones(2, 2))


def test_wide_ffn_refit_blockwise_comes_close_to_the_joint_solve(monkeypatch):
    # F + E above MAX_FEATURES: experts are refit one block at a time (Gauss-Seidel sweeps)
    g = torch.Generator().manual_seed(0)
    T, H, F_, E, k = 1200, 12, 48, 6, 2
    x = torch.randn(T, H, generator=g)
    a = torch.relu(x @ torch.randn(H, F_, generator=g))
    owner = torch.arange(F_) // (F_ // E)
    logits = torch.randn(T, E, generator=g) + (a.reshape(T, E, -1).sum(-1))           # informative router
    chosen = moefy_refit.chosen_mask(logits, 0, k)
    w_out, b_out = torch.randn(H, F_, generator=g), torch.randn(H, generator=g)
    fit, val = torch.arange(T) % 5 != 0, torch.arange(T) % 5 == 0
    joint = moefy_refit.refit(a, chosen, owner, w_out, b_out, fit, val)[2]
    monkeypatch.setattr(moefy_refit, "MAX_FEATURES", F_)
    w_a, d, block = moefy_refit.refit(a, chosen, owner, w_out, b_out, fit, val)
    assert block["val_error"] < 0.9 * block["val_error_bias_only"]
    assert block["val_error"] < 1.15 * joint["val_error"]
    y = a @ w_out.t() + b_out
    err = moefy_refit.rel_error(moefy_refit.predict(a[val], chosen[val], owner, w_a, d), y[val])
    assert err == pytest.approx(block["val_error"], rel=1e-5)
