"""The suite's numerics policy (tests/numerics.py) accepts rounding and refuses real differences."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close, assert_identical, assert_state_close, tolerances


def test_a_few_ulps_at_the_scale_of_the_reference_pass():
    ref = torch.linspace(-45, 45, 101)
    eps = torch.finfo(torch.float32).eps
    assert_close(ref + 3 * eps * 45, ref)  # gradients of magnitude 45 off by 3 ulps of 45 (float32 rounding)
    assert_close(ref.double() * (1 + 1e-14), ref.double())  # float64 gets its own, finer budget


def test_an_element_near_zero_is_judged_at_the_scale_of_the_whole_reference():
    ref = torch.tensor([1e-8, 10.0])
    assert_close(torch.tensor([1e-8 + 1e-6, 10.0]), ref)  # 1e-6 is 0.8 ulp of 10
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1e-8 + 1e-3, 10.0]), ref)


def test_real_differences_fail():
    ref = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_close(ref * (1 + 1e-4), ref)  # a relative error of 1e-4 is no rounding in float32
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:, None], ref)
    with pytest.raises(AssertionError):
        assert_close(ref.bfloat16() * 1.1, ref)


def test_bf16_is_judged_in_bf16_and_the_stated_scale_is_used():
    ref = torch.randn(32, generator=torch.Generator().manual_seed(1))
    assert_close(ref.bfloat16(), ref)  # one rounding to bf16
    rtol, atol = tolerances(ref.bfloat16(), ref)
    assert rtol == 4 * torch.finfo(torch.bfloat16).eps
    _, atol_scaled = tolerances(ref, torch.zeros(3), scale=2.0)
    assert atol_scaled == pytest.approx(64 * torch.finfo(torch.float32).eps * 2.0)


def test_identical_means_bit_for_bit_and_state_dicts_compare_key_by_key():
    a = torch.tensor([1.0, 2.0])
    assert_identical(a, a.clone())
    with pytest.raises(AssertionError):
        assert_identical(a, a + torch.finfo(torch.float32).eps)
    assert_state_close({"w": a}, {"w": a.clone()})
    with pytest.raises(AssertionError, match="keys differ"):
        assert_state_close({"w": a}, {"v": a})
