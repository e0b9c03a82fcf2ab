"""Steering coefficients: one check shared by vectors, the code that applies them and the evaluation."""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import ConfigError


def check_coefficient(value) -> float:
    """A finite real coefficient as a float, else a `ConfigError`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"a steering coefficient must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"a steering coefficient must be finite, got {value!r}")
    return float(value)


def is_vector(value) -> bool:
    """Whether `value` is a steering vector (anything that binds itself to a model the way `SteeringVector` does).
    `apply.py` asks this instead of importing `vector.py`, which imports it for `SteeringVector.apply`."""
    return callable(getattr(value, "to_bindings", None)) and isinstance(getattr(value, "directions", None), dict)
