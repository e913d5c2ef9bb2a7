"""Router math: hand-computed cases per family, the transformers routers it must reproduce,
gradients through the op, and properties over random shapes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moecc.ops  # noqa: F401
from moecc.errors import MoeccError
from moecc.ops import call_moe
from moecc.routing import (apply_capacity, capacity_factor_for, check, dropped_fraction,
                           expert_choice_capacity, expert_load, route, router_probs, token_capacity)
from moecc.spec import MoESpec, RouterSpec


def spec(E=4, kind="softmax_topk", k=2, **router):
    return MoESpec(E, 4, 3, router=RouterSpec(kind, k, **router), name="layer0")


def log(*p):
    return torch.tensor([p], dtype=torch.float64).log()


def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-6, atol=1e-9)


# --- hand-computed cases -------------------------------------------------------------------------

def test_softmax_topk_renormalized_raw_and_scaled():
    logits = log(0.1, 0.2, 0.3, 0.4)                                   # softmax -> 0.1 .. 0.4
    w, ids = route(logits, spec())
    assert ids.tolist() == [[3, 2]]
    close(w, [[0.4 / 0.7, 0.3 / 0.7]])
    w, _ = route(logits, spec(renormalize=False))
    close(w, [[0.4, 0.3]])
    w, _ = route(logits, spec(renormalize=False, scaling=2.5))
    close(w, [[1.0, 0.75]])


def test_topk_softmax():
    w, ids = route(torch.tensor([[1.0, 3.0, 2.0, 0.0]], dtype=torch.float64), spec(kind="topk_softmax"))
    assert ids.tolist() == [[1, 2]]
    e = math.e
    close(w, [[e / (1 + e), 1 / (1 + e)]])


def test_softmax_group_limited_deepseek_v2():
    # groups {0,1} {2,3}; group max .35 vs .31 -> keeps group 0 although expert 2 (.31) beats expert 1
    logits = log(0.35, 0.05, 0.31, 0.29)
    w, ids = route(logits, spec(n_groups=2, topk_groups=1, group_score="max", renormalize=False))
    assert ids.tolist() == [[0, 1]]
    close(w, [[0.35, 0.05]])


S_V3 = [0.9, 0.1, 0.6, 0.5, 0.25, 0.8, 0.3, 0.7]                       # sigmoid scores


def test_sigmoid_topk_group_limited_no_bias():
    # groups (top-2 sums): 1.0, 1.1, 1.05, 1.0 -> keep groups 1, 2 -> experts 2,3,4,5 -> 5 (.8), 2 (.6);
    # expert 0 (0.9, the best overall) is outside the kept groups
    logits = torch.logit(torch.tensor([S_V3], dtype=torch.float64))
    w, ids = route(logits, spec(8, "sigmoid_topk", n_groups=4, topk_groups=2))
    assert ids.tolist() == [[5, 2]]
    close(w, [[0.8 / 1.4, 0.6 / 1.4]])


def test_sigmoid_topk_correction_bias_only_chooses_and_scaling():
    # bias +.55 on expert 6: choice = .9 .1 .6 .5 .25 .8 .85 .7 -> group sums 1.0 1.1 1.05 1.55
    # -> groups 3, 1 -> experts 6 (.85 biased), 7 (.7); weights are the UNbiased scores .3, .7
    logits = torch.logit(torch.tensor([S_V3], dtype=torch.float64))
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0.55, 0], dtype=torch.float64)
    w, ids = route(logits, spec(8, "sigmoid_topk", n_groups=4, topk_groups=2, scaling=2.5), bias)
    assert ids.tolist() == [[6, 7]]
    close(w, [[0.3 * 2.5, 0.7 * 2.5]])
    w, ids = route(logits, spec(8, "sigmoid_topk", renormalize=False), bias)   # no groups
    assert ids.tolist() == [[0, 6]]                                       # .9, then .85 (.3 + bias)
    close(w, [[0.9, 0.3]])


def test_hierarchical_groups_first():
    # group p = .3 .7; within: (.6 .4) (.2 .8) -> p(e) = .18 .12 .14 .56
    logits = torch.cat([log(0.3, 0.7), log(0.6, 0.4), log(0.2, 0.8)], dim=1)
    w, ids = route(logits, spec(kind="hierarchical", n_groups=2, topk_groups=1))
    assert ids.tolist() == [[3, 2]]                                       # not 0 (.18): group 0 is out
    close(w, [[0.8, 0.2]])
    w, ids = route(logits, spec(kind="hierarchical", n_groups=2, topk_groups=2, renormalize=False))
    assert ids.tolist() == [[3, 0]]
    close(w, [[0.56, 0.18]])
    close(router_probs(logits, spec(kind="hierarchical", n_groups=2)), [[0.18, 0.12, 0.14, 0.56]])


def test_expert_choice_each_expert_takes_its_top_tokens():
    p = torch.tensor([[0.7, 0.25, 0.05], [0.6, 0.3, 0.1], [0.5, 0.35, 0.15], [0.1, 0.1, 0.8]],
                     dtype=torch.float64)
    s = spec(3, "expert_choice", capacity_factor=1.0)                     # C = ceil(4/3) = 2
    assert expert_choice_capacity(4, s) == 2
    w, ids = route(p.log(), s)
    assert ids.tolist() == [[0, -1, -1], [0, 1, -1], [-1, 1, 2], [-1, -1, 2]]
    close(w, [[0.7, 0, 0], [0.6, 0.3, 0], [0, 0.35, 0.15], [0, 0, 0.8]])
    w, ids = route(p[:, :2].log(), spec(2, "expert_choice", capacity_factor=0.5))    # C = 1
    assert ids.tolist() == [[0, -1], [-1, -1], [-1, -1], [-1, 1]]
    assert dropped_fraction(ids, spec(2, "expert_choice")) == 0.5


def test_hash_routing_table():
    ids_in = torch.tensor([0, 1, 5, 7])
    w, ids = route(torch.zeros(4, 4), spec(kind="hash"), token_ids=ids_in)
    # (id · 2654435761) mod 2^31 = 0, 506952113, 387276917, 1401181143 -> mod 4 = 0, 1, 1, 3
    assert ids.tolist() == [[0, 1], [1, 2], [1, 2], [3, 0]]
    close(w, torch.full((4, 2), 0.5))
    with pytest.raises(MoeccError, match="layer0: hash routing needs token ids"):
        route(torch.zeros(4, 4), spec(kind="hash"))


def test_capacity_is_slot_major():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    s = spec(capacity_factor=0.5)                                         # C = ceil(.5·4·2/4) = 1
    assert token_capacity(4, s) == 1
    w2, ids2 = apply_capacity(w, ids, s)
    # slot 0 first: t0→0 ✓, t1→0 ✗, t2→1 ✓, t3→3 ✓; then slot 1: t0→1 ✗, t1→2 ✓, t2→0 ✗, t3→1 ✗
    assert ids2.tolist() == [[0, -1], [-1, 2], [1, -1], [3, -1]]
    close(w2, [[0.6, 0], [0, 0.3], [0.5, 0], [0.9, 0]])
    assert dropped_fraction(ids2) == 0.5
    assert expert_load(ids2, 4).tolist() == [1, 1, 1, 1]
    assert token_capacity(10, spec(capacity_factor=1.25)) == 7            # ceil(1.25·10·2/4) = ceil(6.25)


def test_dynamic_capacity_factor_covers_the_busiest_expert():
    s = spec(capacity_factor=1.0)
    cf = capacity_factor_for(0.4, s)                                      # busiest took 40% of T·k
    assert cf == pytest.approx(1.6)
    assert token_capacity(10, spec(capacity_factor=cf)) == 8              # = 0.4 · 10 · 2
    assert capacity_factor_for(0.25, s, margin=1.2) == pytest.approx(1.2)
    with pytest.raises(MoeccError, match="layer0"):
        capacity_factor_for(0.0, s)


def test_fp32_router_upcasts_half_but_keeps_float64():
    logits = torch.randn(3, 4)
    w, _ = route(logits.bfloat16(), spec())
    assert w.dtype == torch.float32
    assert route(logits.double(), spec())[0].dtype == torch.float64
    assert route(logits.bfloat16(), spec(fp32=False))[0].dtype == torch.bfloat16


def test_router_specific_checks_name_the_layer():
    with pytest.raises(MoeccError, match="layer0: n_groups=2 .* not topk_softmax"):
        check(spec(kind="topk_softmax", n_groups=2))
    with pytest.raises(MoeccError, match="layer0: group_score"):
        check(spec(kind="sigmoid_topk", n_groups=2, group_score="mean"))
    with pytest.raises(MoeccError, match="layer0: hierarchical routing needs n_groups"):
        check(spec(kind="hierarchical"))
    with pytest.raises(MoeccError, match="layer0: hierarchical routing needs G\\+E=6"):
        route(torch.zeros(2, 4), spec(kind="hierarchical", n_groups=2))
    with pytest.raises(MoeccError, match="layer0: top-k must be in 1..E=4, got k=5"):
        check(spec(k=5))
    with pytest.raises(MoeccError, match="layer0: capacity factor must be > 0"):
        check(spec(capacity_factor=0.0))
    with pytest.raises(MoeccError, match="layer0: n_groups=3 does not divide E=4"):
        check(spec(kind="sigmoid_topk", n_groups=3))


# --- the routers of real model families (transformers' own code) ----------------------------------

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    from transformers.models.gpt_oss import modeling_gpt_oss as oss
    from transformers.models.mixtral import modeling_mixtral as mix
    return v2, v3, oss, mix


def _same_routing(ref_w, ref_ids, w, ids):
    """Equal as sets per token (transformers' topk is sorted=False; ours is sorted by score)."""
    order_ref, order = ref_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(ref_ids.gather(1, order_ref), ids.gather(1, order))
    torch.testing.assert_close(ref_w.gather(1, order_ref).float(), w.gather(1, order).float())


def test_matches_deepseek_v3_router(hf):
    v2, v3, oss, mix = hf
    torch.manual_seed(0)
    cfg = v3.DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                              topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    router = v3.DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(0, 0.3)                        # negative biases too
    x = torch.randn(64, 16)
    logits, ref_w, ref_ids = router(x)
    s = MoESpec(16, 16, 8, router=RouterSpec("sigmoid_topk", 3, n_groups=4, topk_groups=2, scaling=2.5))
    w, ids = route(logits, s, router.e_score_correction_bias)
    _same_routing(ref_w, ref_ids, w, ids)


def test_matches_deepseek_v2_mixtral_gpt_oss_routers(hf):
    v2, v3, oss, mix = hf
    torch.manual_seed(1)
    x = torch.randn(32, 16)
    cfg = v2.DeepseekV2Config(hidden_size=16, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                              topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    r2 = v2.DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(r2.weight)
    logits, ref_w, ref_ids = r2(x)
    s = MoESpec(8, 16, 8, router=RouterSpec("softmax_topk", 2, renormalize=False, scaling=1.5, n_groups=4,
                                            topk_groups=2, group_score="max"))
    _same_routing(ref_w, ref_ids, *route(logits, s))
    rm = mix.MixtralTopKRouter(mix.MixtralConfig(hidden_size=16, num_attention_heads=2, num_local_experts=8,
                                                 num_experts_per_tok=2))
    torch.nn.init.normal_(rm.weight)
    logits, ref_w, ref_ids = rm(x)
    _same_routing(ref_w, ref_ids, *route(logits, MoESpec(8, 16, 8, router=RouterSpec("softmax_topk", 2))))
    ro = oss.GptOssTopKRouter(oss.GptOssConfig(hidden_size=16, num_attention_heads=2, num_local_experts=8,
                                               num_experts_per_tok=3))
    torch.nn.init.normal_(ro.weight)
    logits, ref_w, ref_ids = ro(x)
    _same_routing(ref_w, ref_ids, *route(logits, MoESpec(8, 16, 8, router=RouterSpec("topk_softmax", 3))))


# --- gradients through the op (float64, finite differences) ---------------------------------------

GRAD_CASES = {
    "softmax_topk": dict(kind="softmax_topk"),
    "softmax_topk_raw_capacity": dict(kind="softmax_topk", renormalize=False, capacity_factor=0.75),
    "topk_softmax": dict(kind="topk_softmax"),
    "sigmoid_topk_groups": dict(kind="sigmoid_topk", n_groups=2, topk_groups=1, scaling=2.0),
    "expert_choice": dict(kind="expert_choice", capacity_factor=1.0),
    "hash": dict(kind="hash"),
    "hierarchical": dict(kind="hierarchical", n_groups=2, topk_groups=1),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_through_the_op(case):
    r = dict(GRAD_CASES[case])
    kind = r.pop("kind")
    s = MoESpec(4, 3, 2, activation="silu", router=RouterSpec(kind, 2, **r), shared_ffn=2, shared_gated=True)
    g = torch.Generator().manual_seed(3)
    L = 6 if kind == "hierarchical" else 4
    x, logits = torch.randn(5, 3, generator=g), torch.randn(5, L, generator=g)
    w_in, w_out = torch.randn(4, 2, 3, generator=g), torch.randn(4, 3, 2, generator=g)
    sw_in, sw_out, gate = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g), torch.randn(1, 3, generator=g)
    inputs = [t.double().requires_grad_() for t in (x, logits, w_in, w_out, sw_in, sw_out, gate)]
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64) if kind == "sigmoid_topk" else None
    tok = torch.tensor([3, 1, 4, 1, 5]) if kind == "hash" else None

    def f(x, logits, w_in, w_out, sw_in, sw_out, gate):
        return call_moe(x, logits, w_in, w_out, s, router_bias=bias, shared_w_in=sw_in,
                        shared_w_out=sw_out, shared_gate=gate, token_ids=tok)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    if kind != "hash":                      # the router gets a gradient (hash has no router)
        f(*inputs).pow(2).sum().backward()
        assert inputs[1].grad.abs().sum() > 0


def test_shared_expert_ungated_and_sigmoid_gated():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    w_in, w_out = torch.randn(4, 2, 3), torch.randn(4, 3, 2)
    sw_in, sw_out, gate = torch.randn(2, 3), torch.randn(3, 2), torch.randn(1, 3)
    s = MoESpec(4, 3, 2, activation="relu", router=RouterSpec("softmax_topk", 1), shared_ffn=2)
    logits = torch.tensor([[5.0, 0, 0, 0]]).expand(5, 4)                   # expert 0, weight 1
    routed = call_moe(x, logits, w_in, w_out, s)
    torch.testing.assert_close(routed, torch.relu(x @ w_in[0].T) @ w_out[0].T)
    shared = torch.relu(x @ sw_in.T) @ sw_out.T
    y = call_moe(x, logits, w_in, w_out, s, shared_w_in=sw_in, shared_w_out=sw_out)
    torch.testing.assert_close(y, routed + shared)
    y = call_moe(x, logits, w_in, w_out, s.replace(shared_gated=True), shared_w_in=sw_in,
                 shared_w_out=sw_out, shared_gate=gate)
    torch.testing.assert_close(y, routed + torch.sigmoid(x @ gate.T) * shared)


# --- properties ------------------------------------------------------------------------------------

KINDS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "hierarchical", "hash", "expert_choice")


@st.composite
def routing_case(draw):
    kind = draw(st.sampled_from(KINDS))
    G = {"softmax_topk": draw(st.sampled_from([1, 2])), "sigmoid_topk": draw(st.sampled_from([1, 2])),
         "hierarchical": draw(st.sampled_from([2, 3]))}.get(kind, 1)
    E = G * draw(st.integers(2 if G == 1 else 1, 4))
    tg = draw(st.integers(1, G))
    k = draw(st.integers(1, tg * (E // G)))
    cf = draw(st.sampled_from([None, 0.5, 1.0, 1.5]))
    r = RouterSpec(kind, k, renormalize=draw(st.booleans()), scaling=draw(st.sampled_from([1.0, 2.5])),
                   n_groups=G, topk_groups=tg, capacity_factor=cf)
    T = draw(st.integers(1, 12))
    return check(MoESpec(E, 4, 3, router=r)), T, draw(st.integers(0, 2 ** 16))


@settings(max_examples=150, deadline=None)
@given(routing_case())
def test_routing_properties(case):
    s, T, seed = case
    r, E = s.router, s.num_experts
    g = torch.Generator().manual_seed(seed)
    L = E + r.n_groups if r.kind == "hierarchical" else E
    logits = torch.randn(T, L, generator=g, dtype=torch.float64) * 3
    bias = torch.randn(E, generator=g, dtype=torch.float64) if r.kind == "sigmoid_topk" else None
    w, ids = route(logits, s, bias, torch.randint(0, 1000, (T,), generator=g))
    assert (w >= 0).all() and ((ids >= 0) | (w == 0)).all()
    for row in ids.tolist():                                              # distinct experts per token
        kept = [i for i in row if i >= 0]
        assert len(kept) == len(set(kept)) and all(0 <= i < E for i in kept)
    load = expert_load(ids, E)
    if r.kind == "expert_choice":
        assert (load == expert_choice_capacity(T, s)).all()               # exactly C tokens each
        return
    if r.capacity_factor is not None:
        assert (load <= token_capacity(T, s)).all()                        # capacity never exceeded
        return
    assert (ids >= 0).all()                                               # dropless keeps all
    if r.renormalize or r.kind in ("topk_softmax", "hash"):
        torch.testing.assert_close(w.sum(-1), torch.full((T,), r.scaling, dtype=w.dtype))
