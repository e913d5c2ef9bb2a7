"""Issue 15 item 4, TVM: random models of LAYERS random MoE layers (tests/random_layers.py: E, k, F, every
router kind and option, activation, biases, shared expert, capacity) in float32, float16 or bfloat16,
exported with symbolic token dims and compiled ONCE each (TVM compiles are slow: one library serves every
token count), then run at 0, 1 and a random number of tokens against the eager model (the reference).
`make test` draws N_FAST models; `make test-slow` (MOECC_SLOW=1) draws N_SLOW."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moecc.backends.tvm import lower, runtime
from numerics import assert_numerically_equal
from random_layers import Side, layers

H, LAYERS = 8, 3
N_FAST, N_SLOW = 2, int(os.environ.get("MOECC_TVM_PROPERTY_MODELS", 40))     # the env var: a shorter campaign
ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _inputs(B: int, S: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, generator=g).to(dtype), torch.randint(0, 1000, (B, S), generator=g)


def _feed(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _check(tmp_path, specs, dtype, B, S, seed):
    model = Side(list(specs), seed=seed).to(dtype)
    dims = {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=4096)}
    program = torch.export.export(model, _inputs(2, 3, dtype, seed), dynamic_shapes=(dims, dims))
    low = lower.lower(program, tmp_path, {})
    run = runtime.load(tmp_path)
    for shape in ((1, 0), (1, 1), (B, S)):                   # 0 and 1 tokens, then a random count
        args = _inputs(*shape, dtype, seed + 1)
        got = run([_feed(a) for a in args])
        with torch.no_grad():
            want = [w.float().numpy() for w in model(*args)]
        for s, c, g, w in zip(specs, low.kernels, got, want):
            # float32: 1e-5; half: 2 ulp of the output's largest value (TVM and torch round alike
            # per op, but accumulate in another order)
            atol = max(1e-5, 2 * ULP[dtype] * float(np.abs(w).max(initial=0.0)))
            assert_numerically_equal(g.astype(np.float32), w, atol=atol, rtol=1e-5 if dtype == torch.float32 else 0,
                                     what=f"{c.kernel} {dtype} {s.to_json()} at {shape}")


models = dict(specs=st.tuples(*(layers(f"p{i}", H) for i in range(LAYERS))),
              dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
              B=st.integers(1, 3), S=st.integers(2, 9), seed=st.integers(0, 2 ** 16))


@settings(max_examples=N_FAST, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**models)
def test_random_layers_match_the_reference(tmp_path_factory, specs, dtype, B, S, seed):
    _check(tmp_path_factory.mktemp("tvm_prop"), specs, dtype, B, S, seed)


@pytest.mark.slow
@settings(max_examples=N_SLOW, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**models)
def test_random_layers_match_the_reference_campaign(tmp_path_factory, specs, dtype, B, S, seed):
    """`make test-slow`: N_SLOW random models (N_SLOW × LAYERS layers), each compiled once."""
    _check(tmp_path_factory.mktemp("tvm_prop"), specs, dtype, B, S, seed)
