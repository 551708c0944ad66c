"""The GPU tests' tolerances bound what they claim: the half-precision rule (tests/gpu_utils.py) fails on one wrong
element that the norm-wise check lets through, and passes the low-precision reference itself."""

from __future__ import annotations

import pytest
import torch

from tests.gpu_utils import assert_rel, assert_within_reference_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rule_catches_one_wrong_element(dtype):
    g = torch.Generator().manual_seed(0)
    want = torch.randn(4096, generator=g, dtype=torch.float64)
    low = want.to(dtype)
    assert_within_reference_error(low, want, low, "the reference in low precision")
    planted = low.clone()
    planted[17] += 0.1  # one element off by a tenth of the values' scale
    assert_rel(planted, want, dtype, "norm-wise")  # passes: 1 of 4096 elements
    with pytest.raises(AssertionError, match="worst element off by"):
        assert_within_reference_error(planted, want, low, "planted")
