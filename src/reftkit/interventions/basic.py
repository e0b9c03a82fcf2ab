"""Basic interventions: replace (interchange), add, subtract, scale, zero, noise, collect, skip and any callable.

All act on the selected vectors only and are out of place. `interchange_dim` (first k dimensions) and per-call
`subspaces` restrict the edit to part of the vector, as in pyvene. Add/subtract take either a source (a source
run or precomputed source representations) or a stored `vector` (a steering direction), times `coefficient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, InterventionError
from .base import Intervention, InterventionConfig, register, subspace_mix


@dataclass
class SubspaceConfig(InterventionConfig):
    interchange_dim: int | None = None


@register("replace")
class ReplaceIntervention(Intervention):
    """Interchange: the base vectors take the source's values (on the addressed dimensions)."""

    config_class = SubspaceConfig
    source = "required"

    def forward(self, base, source=None, subspaces=None):
        return subspace_mix(base, source.to(base.dtype), subspaces, self.config.interchange_dim)


@dataclass
class VectorConfig(SubspaceConfig):
    coefficient: float = 1.0
    has_vector: bool = False  # a stored vector [embed_dim] is used when no source is given


class _VectorIntervention(Intervention):
    config_class = VectorConfig
    source = "optional"
    sign = 1.0

    def __init__(self, config=None, vector: torch.Tensor | None = None, **kw):
        if vector is not None:
            kw.setdefault("has_vector", True)
            kw.setdefault("embed_dim", int(vector.shape[-1]))
        super().__init__(config, **kw)
        if self.config.has_vector:
            if self.config.embed_dim is None:
                raise ConfigError(f"{self.type_name} with a stored vector needs embed_dim")
            init = torch.zeros(self.config.embed_dim) if vector is None else vector.detach().clone().float().reshape(-1)
            self.vector = nn.Parameter(init, requires_grad=False)
        else:
            self.vector = None

    def forward(self, base, source=None, subspaces=None):
        if source is None:
            if self.vector is None:
                raise InterventionError(f"{self.type_name} has no stored vector and got no source")
            source = self.vector.to(base.dtype).expand_as(base)
        delta = source.to(base.dtype) * (self.sign * self.config.coefficient)
        return subspace_mix(base, base + delta, subspaces, self.config.interchange_dim)


@register("add")
class AddIntervention(_VectorIntervention):
    """`h + c * v`, with `v` the source vectors or the stored vector."""


@register("subtract")
class SubtractIntervention(_VectorIntervention):
    """`h - c * v`, with `v` the source vectors or the stored vector."""

    sign = -1.0


@dataclass
class ScaleConfig(SubspaceConfig):
    factor: float = 1.0


@register("scale")
class ScaleIntervention(Intervention):
    config_class = ScaleConfig

    def forward(self, base, source=None, subspaces=None):
        return subspace_mix(base, base * self.config.factor, subspaces, self.config.interchange_dim)


@register("zero")
class ZeroIntervention(Intervention):
    config_class = SubspaceConfig

    def forward(self, base, source=None, subspaces=None):
        return subspace_mix(base, torch.zeros_like(base), subspaces, self.config.interchange_dim)


@dataclass
class NoiseConfig(SubspaceConfig):
    std: float = 1.0
    seed: int = 0


@register("noise")
class NoiseIntervention(Intervention):
    """Adds Gaussian noise of standard deviation `std`. The noise is drawn from a generator seeded with `seed`
    on every call, so the same inputs always get the same noise, whatever the batch shape."""

    config_class = NoiseConfig

    def forward(self, base, source=None, subspaces=None):
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float32).to(base.device, base.dtype)
        return subspace_mix(base, base + self.config.std * noise, subspaces, self.config.interchange_dim)


@register("collect")
class CollectIntervention(Intervention):
    """Records the selected vectors (the engine stores them under the binding's name); changes nothing."""

    collects = True

    def forward(self, base, source=None, subspaces=None):
        return base


@register("skip")
class SkipIntervention(Intervention):
    """The module's output at the selected positions becomes its input: the module is skipped there."""

    config_class = SubspaceConfig
    source = "module_input"

    def forward(self, base, source=None, subspaces=None):
        return subspace_mix(base, source.to(base.dtype), subspaces, self.config.interchange_dim)


@register("callable")
class CallableIntervention(Intervention):
    """Wraps any `fn(base, source) -> tensor`. Not saveable: a function is code, and configs are data."""

    source = "optional"

    def __init__(self, fn: Callable[..., torch.Tensor], config=None, **kw):
        super().__init__(config, **kw)
        if not callable(fn):
            raise ConfigError("CallableIntervention needs a callable fn(base, source) -> tensor")
        self.fn = fn

    def forward(self, base, source=None, subspaces=None):
        out = self.fn(base, source)
        if not isinstance(out, torch.Tensor) or out.shape != base.shape:
            raise InterventionError(
                f"the callable intervention returned {getattr(out, 'shape', type(out))}; expected a tensor of shape "
                f"{tuple(base.shape)}"
            )
        return out

    def spec(self) -> dict:
        raise ConfigError("a callable intervention cannot be saved: configs are data, not code")
