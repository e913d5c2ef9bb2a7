import pytest

from moecc.errors import MoeccError
from moecc.spec import MoESpec, RouterSpec


def test_json_roundtrip():
    s = MoESpec(num_experts=8, hidden=4, ffn=6, activation="swiglu", shared_ffn=3, shared_gated=True,
                router=RouterSpec("sigmoid_topk", 2, n_groups=4, topk_groups=2, scaling=2.5), name="l0")
    assert MoESpec.from_json(s.to_json()) == s


@pytest.mark.parametrize("kw,msg", [
    (dict(num_experts=1), "at least 2 experts"),
    (dict(router=RouterSpec(top_k=9)), "top-k must be in 1..E=8"),
    (dict(router=RouterSpec(top_k=0)), "top-k must be in 1..E=8"),
    (dict(router=RouterSpec(capacity_factor=0)), "capacity factor must be > 0"),
    (dict(router=RouterSpec("sigmoid_topk", n_groups=3)), "n_groups=3 does not divide E=8"),
    (dict(activation="tanh"), "unknown activation"),
])
def test_validate_names_the_problem(kw, msg):
    base = dict(num_experts=8, hidden=4, ffn=6, name="blocks.0.ffn")
    with pytest.raises(MoeccError, match=msg) as e:
        MoESpec(**{**base, **kw}).validate()
    assert "blocks.0.ffn" in str(e.value)


def test_params_total_and_active():
    s = MoESpec(num_experts=4, hidden=2, ffn=3, router=RouterSpec(top_k=1))
    per_expert = 3 * 2 + 2 * 3
    assert s.params() == (4 * per_expert + 4 * 2, per_expert + 4 * 2)


@pytest.mark.parametrize("activation,shared_gated", [("gelu", True), ("gelu", False), ("swiglu", True),
                                                     ("swiglu", False)])
def test_shared_expert_rows_and_params_match_a_real_layer(activation, shared_gated):
    """shared_in_rows (2·shared_ffn only for a gated activation; the sigmoid gate does not double it)
    and shared_params count exactly the shared tensors an nn.MoE layer holds."""
    from moecc.nn import MoE
    s = MoESpec(4, 6, 5, activation, RouterSpec(top_k=1), shared_ffn=3, shared_gated=shared_gated)
    m = MoE(s)
    assert m.shared_w_in.shape == (s.shared_in_rows, 6) == ((6 if s.gated else 3), 6)
    held = sum(p.numel() for n, p in m.named_parameters() if n.startswith("shared_"))
    assert s.shared_params() == held


def test_spec_string_is_made_once_and_follows_replace():
    """Every MoE op call passes spec.to_json() and parses it back: both are cached (the string on the
    frozen instance, one instance per string), and a replaced spec gets its own string."""
    from moecc.spec import MoESpec, RouterSpec
    s = MoESpec(num_experts=8, hidden=16, ffn=32, router=RouterSpec(top_k=2))
    js = s.to_json()
    assert s.to_json() is js and MoESpec.from_json(js) is MoESpec.from_json(js) and MoESpec.from_json(js) == s
    t = s.replace(router=RouterSpec(top_k=3))
    assert t.to_json() != js and MoESpec.from_json(t.to_json()) == t and MoESpec.from_json(js) == s
