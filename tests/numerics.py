"""The suite's numerics policy: how close is "equal" when two computations are the same mathematics.

Floating-point results depend on the processor: the BLAS kernel, the vector width (AVX2, AVX-512, NEON), whether
bf16 is native, and the order of a reduction all change the last bits. A tolerance tuned on one processor fails
on another, so every comparison with a reference (pyreft / pyvene fixtures, a naive re-implementation, the same
computation batched differently) goes through `assert_close` here:

- relative tolerance `ulps * eps(dtype)`: a budget of rounding steps, not a magic number;
- absolute floor `ulps * eps(dtype) * scale`, where `scale` is the largest magnitude of the reference (or a scale
  the caller states, for results that come out of cancellation, e.g. the small difference of two large logits):
  an element near zero is judged against the size of the numbers that produced it, not against itself.

The default budget is 64 ulps for 32- and 64-bit floats (7.6e-6 relative in float32: differences of kernel and
reduction order are a few ulps; a wrong formula is off by orders of magnitude more) and 4 ulps for bf16/fp16,
whose single rounding step is already coarse. `dtype` defaults to the *coarser* of the two tensors' dtypes.

Bit-exactness is asserted with `assert_identical`, and only where it holds by construction on one machine:
hooks removed, adapters disabled, an edit of zero, a tensor saved and loaded. Never against a fixture made on
another machine.
"""

from __future__ import annotations

import math

import torch

ULPS = {torch.float64: 64, torch.float32: 64, torch.bfloat16: 4, torch.float16: 4}


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    floats = [d for d in (a, b) if d.is_floating_point]
    if not floats:
        return torch.float32
    return max(floats, key=lambda d: torch.finfo(d).eps)


def tolerances(actual, expected, *, dtype: torch.dtype | None = None, ulps: float | None = None,
               scale: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for comparing `actual` with the reference `expected` under the policy above."""
    actual, expected = _tensor(actual), _tensor(expected)
    dtype = dtype or _coarser(actual.dtype, expected.dtype)
    eps = torch.finfo(dtype).eps
    budget = ULPS.get(dtype, 64) if ulps is None else ulps
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if not math.isfinite(scale):
        raise ValueError(f"the reference holds non-finite values (scale {scale}); compare those explicitly")
    rtol = budget * eps
    return rtol, rtol * max(scale, torch.finfo(dtype).tiny)


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, ulps: float | None = None,
                 scale: float | None = None, msg: str | None = None) -> None:
    """`actual` equals the reference `expected` within the rounding budget of `dtype` (see the module docstring).
    Shapes must match exactly; dtypes may differ (a bf16 result against an fp32 reference is judged in bf16)."""
    a, e = _tensor(actual), _tensor(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}" + (f": {msg}" if msg else ""))
    rtol, atol = tolerances(a, e, dtype=dtype, ulps=ulps, scale=scale)
    common = torch.promote_types(a.dtype, e.dtype) if a.dtype.is_floating_point or e.dtype.is_floating_point \
        else torch.float64
    torch.testing.assert_close(a.detach().to(common), e.detach().to(common), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{m}\n{msg}") if msg else None)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Bit-for-bit equality, for identities that hold by construction (see the module docstring)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=(lambda m: f"{m}\n{msg}") if msg else None)


def assert_state_close(actual: dict, expected: dict, **kwargs) -> None:
    """Two state dicts hold the same keys and, key by key, tensors equal under `assert_close`."""
    assert set(actual) == set(expected), f"keys differ: {sorted(set(actual) ^ set(expected))}"
    for key in expected:
        assert_close(actual[key], expected[key], msg=key, **kwargs)
