"""The numerics gates cannot be fooled by NaN/Inf: moecc.verify.compare and tests/numerics.py."""
import numpy as np
import pytest
import torch

from moecc.verify import compare, verify
from numerics import assert_numerically_equal

REF = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["all", "one"])
def test_compare_refuses_non_finite_output(bad, where):
    got = np.full_like(REF, bad) if where == "all" else REF.copy()
    if where == "one":
        got[1, 2] = bad
    max_abs, rel, ok = compare([REF], [got], 1e-4)
    assert not ok and max_abs == float("inf") and not (max_abs <= 1e-4)


def test_compare_accepts_equal_and_matching_non_finite():
    assert compare([REF], [REF + 1e-7], 1e-4)[2]
    ref = REF.copy()
    ref[0, 0], ref[0, 1] = np.inf, np.nan                     # the reference itself overflows
    got = ref.copy()
    got[2, 2] += 1e-7
    max_abs, _, ok = compare([ref], [got], 1e-4)
    assert ok and max_abs < 1e-6
    got[0, 0] = -np.inf
    assert not compare([ref], [got], 1e-4)[2]


def test_verify_check_of_all_nan_backend_fails():
    checks = verify(lambda xs: [np.full_like(REF, np.nan)], lambda xs: [REF], [("example", [REF])], 1e-4)
    assert not checks[0].ok and checks[0].max_abs == float("inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_assert_numerically_equal_fails_on_non_finite(bad):
    ref = torch.from_numpy(REF)
    got = ref.clone()
    got[0, 3] = bad
    with pytest.raises(AssertionError, match="1 of 12 elements differ"):
        assert_numerically_equal(got, ref)
    with pytest.raises(AssertionError):
        assert_numerically_equal(torch.full_like(ref, bad), ref)
    both = ref.clone()
    both[0, 3] = bad
    assert_numerically_equal(both, both.clone())
    assert_numerically_equal(ref.bfloat16(), ref.bfloat16(), atol=0, rtol=0)
