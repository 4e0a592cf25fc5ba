"""The test suite's own comparison: it must be able to fail, non-finite values included."""

from __future__ import annotations

import math

import pytest
import torch

from support import assert_close

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("actual,expected", [
    ([NAN, 1.0], [0.0, 1.0]),    # NaN for a number (NaN > bound is False: once accepted)
    ([0.0, 1.0], [NAN, 1.0]),    # a number for NaN
    ([1.0, 5.0], [1.0, INF]),    # a number for infinity (|x − inf| ≤ rtol·inf was True)
    ([1.0, INF], [1.0, 5.0]),
    ([-INF, 1.0], [INF, 1.0]),   # the other infinity
    ([NAN, 1.0], [INF, 1.0]),
    ([1.0, 2.0], [1.0, 2.5]),    # an ordinary difference
])
def test_assert_close_rejects_what_differs(actual, expected) -> None:
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(actual), torch.tensor(expected), what="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_assert_close_accepts_equal_non_finite_values_and_rounding(dtype) -> None:
    expected = torch.tensor([NAN, INF, -INF, 1.0, -3.0], dtype=dtype)
    actual = expected.clone()
    actual[3] = 1.0 + torch.finfo(dtype).eps  # one unit of rounding
    assert_close(actual, expected, what="x")
