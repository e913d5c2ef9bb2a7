"""Properties: random layers (E, k, F, router kind and options, activation, biases, shared expert,
capacity) through both portable kernels and auto, at 0, 1 and a random number of tokens, match the eager
model (moe_reference). The layer strategy is tests/random_layers.py (shared with the TVM test)."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from numerics import assert_numerically_equal
from onnx_cases import H, Side, eager, inputs, lower, run
from random_layers import layers


@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=st.tuples(layers("p0"), layers("p1"), layers("p2")),
       mode=st.sampled_from([("portable", "onnx.dense_masked"), ("portable", "onnx.gather"), ("auto", None)]),
       B=st.integers(1, 3), S=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_random_layers_match_the_reference(tmp_path_factory, specs, mode, B, S, seed):
    model = Side(list(specs), seed=seed)
    low, path = lower(model, inputs(2, 3, seed=seed), tmp_path_factory.mktemp("prop"),
                      onnx_moe=mode[0], onnx_kernel=mode[1])
    for shape in ((1, 0), (1, 1), (B, S)):                   # 0 and 1 tokens, then a random count
        args = inputs(*shape, seed=seed + 1)
        with torch.no_grad():
            expected = eager(model, args)
        for s, c, g, e in zip(specs, low.kernels, run(path, args), expected):
            assert_numerically_equal(g, e, atol=1e-5, what=f"{c.kernel} {s.to_json()} at {shape}")


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(specs=st.tuples(layers("p0"), layers("p1"), layers("p2")),
       mode=st.sampled_from([("portable", "onnx.dense_masked"), ("portable", "onnx.gather"), ("auto", None)]),
       B=st.integers(1, 3), S=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_random_layers_match_the_reference_campaign(tmp_path_factory, specs, mode, B, S, seed):
    """`make test-slow`: 60 random 3-layer models (180 layers) instead of 3."""
    test_random_layers_match_the_reference.hypothesis.inner_test(tmp_path_factory, specs, mode, B, S, seed)
