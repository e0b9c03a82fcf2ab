"""Steering operators: directional ablation, clamping, ablate-then-add, positional add, neuron edits, and a
norm-preserving wrapper. (Plain `h + c * v`, and the head-level add on a `head_*` site, are `add` in basic.py.)

One formula each, on the selected vectors `h` (the last dimension); `r̂ = r / ‖r‖` is the unit direction (a zero
direction gives `r̂ = 0`, so it edits nothing), `c` the coefficient folded into the config:

- `ablate`: `h − c · r̂ r̂ᵀ h` (c = 1 removes the component along r̂, Arditi et al.'s directional ablation);
- `clamp`: `h − r̂ r̂ᵀ (h − b) + value · r̂`: the projection on r̂, measured from the bias `b`, is set to `value`
  (lm-eval's `clamp`; ACE is `b = r⁻`, `value = α‖r‖`; ablation is `b = 0`, `value = 0`);
- `ablate_then_add`: `h − r̂ r̂ᵀ h + c · r` (equal to `clamp` with `b = 0`, `value = c‖r‖`);
- `positional_add`: `h[k] + c · v[k]` for the k-th selected token, `v [T, d]` (ActAdd; the selection must have
  exactly T slots, e.g. positions `f{T}`);
- `neuron_fill`: `h[i] ← c · u_i`; `neuron_add`: `h[i] ← h[i] + c · u_i`; `neuron_scale`: `h[i] ← c · u_i · h[i]`,
  for the neuron indices `i` (a long tensor) and values `u` (MLP activations, `mlp_activation`);
- `norm_preserving`: wraps another intervention `g`: `g(h) · ‖h‖ / ‖g(h)‖` per vector (the edited vector keeps
  the original length; a vector edited to zero length is left as `g` made it).

Directions and values are frozen weights (float32 parameters without gradients, saved in safetensors; neuron
indices are a long buffer); coefficients, values and the wrapped
intervention's spec are config data. Computation is in the activations' dtype.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, InterventionError
from .base import Intervention, InterventionConfig, build_intervention, register


def _unit(direction: torch.Tensor, dtype) -> torch.Tensor:
    r = direction.float()
    return (r / r.norm().clamp_min(torch.finfo(torch.float32).tiny)).to(dtype)


def _direction_buffer(module: nn.Module, embed_dim: int | None, direction, name: str = "direction") -> None:
    if embed_dim is None:
        raise ConfigError(f"{module.type_name} needs embed_dim (the width of the direction)")
    init = torch.zeros(embed_dim) if direction is None else direction.detach().float().reshape(-1).clone()
    if init.shape[0] != embed_dim:
        raise ConfigError(f"{module.type_name}: {name} has {init.shape[0]} values but embed_dim is {embed_dim}")
    setattr(module, name, nn.Parameter(init, requires_grad=False))


class _Directional(Intervention):
    """An operator along one stored direction (a buffer, not trained): `embed_dim` follows the direction given."""

    def __init__(self, config=None, direction: torch.Tensor | None = None, **kw):
        if direction is not None:
            kw.setdefault("embed_dim", int(direction.shape[-1]))
        super().__init__(config, **kw)
        _direction_buffer(self, self.config.embed_dim, direction)


@dataclass
class AblateConfig(InterventionConfig):
    coefficient: float = 1.0


@register("ablate")
class AblateIntervention(_Directional):
    """Directional ablation: `h − c · r̂ r̂ᵀ h`."""

    config_class = AblateConfig

    def forward(self, base, source=None, subspaces=None):
        r = _unit(self.direction, base.dtype)
        return base - (self.config.coefficient * (base @ r)).unsqueeze(-1) * r


@dataclass
class ClampConfig(InterventionConfig):
    value: float = 0.0
    has_bias: bool = False


@register("clamp")
class ClampIntervention(_Directional):
    """`h − r̂ r̂ᵀ (h − b) + value · r̂`: the projection on r̂, measured from `b`, becomes `value`."""

    config_class = ClampConfig

    def __init__(self, config=None, direction: torch.Tensor | None = None, bias: torch.Tensor | None = None, **kw):
        if bias is not None:
            kw.setdefault("has_bias", True)
        super().__init__(config, direction, **kw)
        if self.config.has_bias:
            _direction_buffer(self, self.config.embed_dim, bias, "bias")
        else:
            if bias is not None:
                raise ConfigError("clamp got a bias but has_bias=False")
            self.bias = None

    def forward(self, base, source=None, subspaces=None):
        r = _unit(self.direction, base.dtype)
        centred = base if self.bias is None else base - self.bias.to(base.dtype)
        return base + (self.config.value - centred @ r).unsqueeze(-1) * r


@dataclass
class AblateThenAddConfig(InterventionConfig):
    coefficient: float = 1.0


@register("ablate_then_add")
class AblateThenAddIntervention(_Directional):
    """`h − r̂ r̂ᵀ h + c · r`: remove the component along r, then add c times r."""

    config_class = AblateThenAddConfig

    def forward(self, base, source=None, subspaces=None):
        r = _unit(self.direction, base.dtype)
        v = self.direction.to(base.dtype)
        return base - (base @ r).unsqueeze(-1) * r + self.config.coefficient * v


@dataclass
class PositionalAddConfig(InterventionConfig):
    length: int = 1
    coefficient: float = 1.0


@register("positional_add")
class PositionalAddIntervention(Intervention):
    """ActAdd: `h[k] + c · v[k]` for the k-th of exactly T selected tokens, `v [T, d]`."""

    config_class = PositionalAddConfig

    def __init__(self, config=None, vectors: torch.Tensor | None = None, **kw):
        if vectors is not None:
            if vectors.dim() != 2:
                raise ConfigError(f"positional_add takes vectors [T, d], got shape {tuple(vectors.shape)}")
            kw.setdefault("length", int(vectors.shape[0]))
            kw.setdefault("embed_dim", int(vectors.shape[1]))
        super().__init__(config, **kw)
        T, d = self.config.length, self.config.embed_dim
        if d is None or not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ConfigError(f"positional_add needs embed_dim and length >= 1, got {d!r} and {T!r}")
        init = torch.zeros(T, d) if vectors is None else vectors.detach().float().clone()
        if init.shape != (T, d):
            raise ConfigError(f"positional_add: vectors {tuple(init.shape)} do not match length {T}, embed_dim {d}")
        self.vectors = nn.Parameter(init, requires_grad=False)

    def check_input(self, base, source, where):
        super().check_input(base, source, where)
        if base.shape[1] != self.config.length:
            raise InterventionError(f"positional_add at {where} adds {self.config.length} vectors but its positions "
                                    f"select {base.shape[1]} slots; use positions 'f{self.config.length}'")

    def forward(self, base, source=None, subspaces=None):
        if base.shape[1] != self.config.length:
            raise InterventionError(f"positional_add adds {self.config.length} vectors to {base.shape[1]} slots")
        return base + self.config.coefficient * self.vectors.to(base.dtype)


@dataclass
class NeuronConfig(InterventionConfig):
    size: int = 1  # number of neurons edited
    coefficient: float = 1.0


class _NeuronIntervention(Intervention):
    config_class = NeuronConfig

    def __init__(self, config=None, neurons=None, values: torch.Tensor | None = None, **kw):
        if neurons is not None:
            neurons = torch.as_tensor(neurons)
            if neurons.dim() != 1 or neurons.dtype.is_floating_point or neurons.dtype == torch.bool:
                raise ConfigError(f"{self.type_name}: neurons must be a 1-D list of integer indices")
            kw.setdefault("size", int(neurons.shape[0]))
        super().__init__(config, **kw)
        n, d = self.config.size, self.config.embed_dim
        if d is None or not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= d:
            raise ConfigError(f"{self.type_name} needs embed_dim and 1 <= size <= embed_dim, got {d!r} and {n!r}")
        index = torch.zeros(n, dtype=torch.long) if neurons is None else neurons.long().clone()
        if index.shape != (n,):
            raise ConfigError(f"{self.type_name}: {index.shape[0]} neuron indices for size {n}")
        if neurons is not None and (int(index.min()) < 0 or int(index.max()) >= d or index.unique().numel() != n):
            raise ConfigError(f"{self.type_name}: neuron indices must be distinct and in 0..{d - 1}")
        init = torch.ones(n) if values is None else values.detach().float().reshape(-1).clone()
        if init.shape != (n,):
            raise ConfigError(f"{self.type_name}: {init.shape[0]} values for {n} neurons")
        self.register_buffer("neurons", index)
        self.values = nn.Parameter(init, requires_grad=False)

    def check_input(self, base, source, where):
        super().check_input(base, source, where)
        idx = self.neurons
        if int(idx.min()) < 0 or int(idx.max()) >= base.shape[-1] or idx.unique().numel() != idx.numel():
            raise InterventionError(f"{self.type_name} at {where}: neuron indices must be distinct and in "
                                    f"0..{base.shape[-1] - 1}")

    @abc.abstractmethod
    def _new(self, old: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The new values of the selected neurons, from their old values and the stored ones."""

    def forward(self, base, source=None, subspaces=None):
        idx = self.neurons.to(base.device)
        old = base.index_select(-1, idx)
        new = self._new(old, self.values.to(base.dtype))
        return base.index_copy(-1, idx, new)


@register("neuron_fill")
class NeuronFillIntervention(_NeuronIntervention):
    """`h[i] ← c · u_i` on the given neurons."""

    def _new(self, old, values):
        return (self.config.coefficient * values).expand_as(old)


@register("neuron_add")
class NeuronAddIntervention(_NeuronIntervention):
    """`h[i] ← h[i] + c · u_i` on the given neurons."""

    def _new(self, old, values):
        return old + self.config.coefficient * values


@register("neuron_scale")
class NeuronScaleIntervention(_NeuronIntervention):
    """`h[i] ← c · u_i · h[i]` on the given neurons."""

    def _new(self, old, values):
        return old * (self.config.coefficient * values)


@dataclass
class NormPreservingConfig(InterventionConfig):
    inner: dict = field(default_factory=dict)  # the wrapped intervention's spec {"type", "config"}


@register("norm_preserving")
class NormPreservingIntervention(Intervention):
    """`g(h) · ‖h‖ / ‖g(h)‖` per vector, for the wrapped intervention `g`."""

    config_class = NormPreservingConfig

    def __init__(self, config=None, inner: Intervention | None = None, **kw):
        if inner is not None:
            if not isinstance(inner, Intervention):
                raise ConfigError(f"norm_preserving wraps a reftkit Intervention, got {type(inner).__name__}")
            kw.setdefault("inner", inner.spec())
            kw.setdefault("embed_dim", inner.embed_dim)
        super().__init__(config, **kw)
        spec = self.config.inner
        if not isinstance(spec, dict) or spec.get("type") in (None, "norm_preserving", "callable"):
            raise ConfigError(f"norm_preserving needs the spec of another saveable intervention, got {spec!r}")
        self.inner = inner if inner is not None else build_intervention(spec)
        if self.inner.source in ("required", "module_input") or self.inner.collects:
            raise ConfigError(f"norm_preserving wraps edits that need no source, not {self.inner.type_name}")

    def check_input(self, base, source, where):
        super().check_input(base, source, where)
        self.inner.check_input(base, source, where)

    def forward(self, base, source=None, subspaces=None):
        new = self.inner(base)
        before = base.norm(dim=-1, keepdim=True)
        after = new.norm(dim=-1, keepdim=True)
        return torch.where(after > 0, new * (before / after.clamp_min(torch.finfo(after.dtype).tiny)), new)
