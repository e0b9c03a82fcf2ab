"""Distributed interventions: interchange in a learned or fixed basis (DAS and its relatives).

- `rotated` (DAS): a full orthogonal rotation `R [d, d]`; rotate base and source (`x @ R`), take the source's
  values on the addressed rotated dimensions, rotate back (`@ R.T`).
- `low_rank_rotated` (DII): `R [d, r]` with orthonormal columns; `base + ((source - base) @ R) @ R.T`, restricted
  to the addressed columns of `R`.
- `boundless_rotated` (Boundless DAS): a learned boundary `b` and a temperature `T` give a soft mask over the
  rotated dimensions, `sigmoid((i - lower) / T) * sigmoid((b * d - i) / T)`.
- `sigmoid_mask_rotated` / `sigmoid_mask`: a learned per-dimension mask `sigmoid(m / T)` in the rotated / the
  original basis.
- `pca_rotated`: a fixed PCA basis (mean, std, components) given at construction or fitted with `fit()`.

Decisions:
- Semantics, parameter names and state-dict keys follow pyvene 0.1.8 (`rotate_layer` with weight `[d, r]` used as
  `x @ weight`, `intervention_boundaries`, `masks`, `pca_components`, ...): a pyvene state dict loads once its
  bookkeeping buffers (`embed_dim`, `interchange_dim`, `intervention_population`) are dropped; tests check parity.
- Interventions act on every selected position separately (`[batch, K, d]`, rotation over `d`); this is pyvene's
  `keep_last_dim=True`. pyvene's default instead concatenates the positions and rotates a `K * d` vector.
- Temperatures are buffers (saved, never trained) changed with `set_temperature`; pyvene makes them parameters,
  so an optimizer given `parameters()` would train them there.
- Subspaces address dimensions of the rotated space: `interchange_dim` (the first k), or per call `subspaces` as
  a LongTensor `[S]` / `[batch, S]` or (ragged) lists. With `subspace_partition` the subspaces name parts of a
  partition instead; a part is `[start, end]` (a range, pyvene's rule for any two-integer part) or an index list.
- The rotation is torch's orthogonal parametrization (matrix exponential for `d x d`, Householder for `d x r`),
  shared with `reft.py`: computed once per call, saved as the computed `rotate_layer.weight` (a pyvene state dict
  with the parametrization's `original` and `base` loads too). Keep it in float32 (`.to(device)`, not a dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InterventionError
from .base import Intervention, InterventionConfig, register
from .rotation import orthogonal_low_rank

Subspaces = torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None


def expand_partition(partition: Sequence[Sequence[int]] | None, width: int | None) -> list[list[int]] | None:
    """Turn `[[start, end], [i, j, k], ...]` into explicit index lists (a two-integer part is a range)."""
    if partition is None:
        return None
    parts = []
    for part in partition:
        part = [int(i) for i in part]
        if len(part) == 2:
            if part[1] <= part[0]:
                raise ConfigError(f"subspace_partition part {part} is an empty range; write [start, end], end > start")
            part = list(range(part[0], part[1]))
        if width is not None and any(i < 0 or i >= width for i in part):
            raise ConfigError(f"subspace_partition part {part} has indices outside [0, {width})")
        parts.append(part)
    return parts


def dims_mask(subspaces: Subspaces, interchange_dim: int | None, partition: list[list[int]] | None,
              width: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask of the addressed dimensions, `[width]` (one row of indices for the whole batch) or
    `[batch, width]` (a row per example, possibly ragged); None when every dimension is addressed."""
    if subspaces is None:
        if interchange_dim is None or interchange_dim >= width:
            return None
        return torch.arange(width, device=device) < interchange_dim
    if isinstance(subspaces, torch.Tensor):
        if subspaces.dim() not in (1, 2) or subspaces.dtype.is_floating_point:
            raise InterventionError(f"subspaces must be integer indices [S] or [batch, S], got {subspaces.shape}")
        subspaces = subspaces.tolist()
    per_example = any(isinstance(i, (list, tuple)) or (isinstance(i, torch.Tensor) and i.dim() > 0) for i in subspaces)
    rows = [[int(i) for i in row] for row in subspaces] if per_example else [[int(i) for i in subspaces]]
    if per_example and len(rows) != batch:
        raise InterventionError(f"per-example subspaces have {len(rows)} rows, the activations a batch of {batch}")
    if partition is not None:
        try:
            rows = [[i for p in row for i in partition[p]] for row in rows]
        except (IndexError, TypeError):
            raise InterventionError(
                f"subspaces {rows} name parts of subspace_partition, which has {len(partition)} parts"
            ) from None
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        if any(i < 0 or i >= width for i in row):
            raise InterventionError(f"subspace indices {row} fall outside the {width} addressable dimensions")
        mask[r, row] = True
    return mask.to(device) if per_example else mask[0].to(device)


def mix_masked(base: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`other` where `mask` ([width] or [batch, width]) is set, `base` elsewhere; out of place."""
    if mask is None:
        return other
    if mask.dim() == 2:
        mask = mask.view(mask.shape[0], *([1] * (base.dim() - 2)), mask.shape[-1])
    return torch.where(mask, other, base)


def _require_width(intervention: Intervention) -> int:
    d = intervention.config.embed_dim
    if d is None or d < 1:
        raise ConfigError(f"{intervention.type_name} needs embed_dim (the width of the vectors it rotates)")
    return int(d)


def _require_source(intervention: Intervention, base: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    if source is None:
        raise InterventionError(f"{intervention.type_name} interchanges with a source; pass source vectors")
    if source.shape != base.shape:
        raise InterventionError(f"{intervention.type_name}: source {tuple(source.shape)} != base {tuple(base.shape)}")
    return source


class _RotatedBase(Intervention):
    """Shared by the types that own a `rotate_layer`."""

    source = "required"

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.width = _require_width(self)
        self.rotate_layer = orthogonal_low_rank(self.width, self.rank, torch.float32)

    @property
    def rank(self) -> int:
        return self.width

    @property
    def rotation(self) -> torch.Tensor:
        """The current orthonormal matrix `[d, rank]`."""
        return self.rotate_layer.weight

    def soft_interchange(self, base, source, subspaces, mask_fn) -> torch.Tensor:
        """`(1 - m) * (base @ R) + m * (source @ R)`, rotated back, with the learned mask `m = mask_fn()`."""
        if subspaces is not None:
            raise InterventionError(
                f"{self.type_name} learns which dimensions to interchange and takes no subspaces; "
                "use rotated or low_rank_rotated to address dimensions"
            )
        source = _require_source(self, base, source)
        r = self.rotate_layer.weight
        rotated_base, rotated_source = base.to(r.dtype) @ r, source.to(r.dtype) @ r
        mask = mask_fn().to(r.dtype)
        return (((1.0 - mask) * rotated_base + mask * rotated_source) @ r.T).to(base.dtype)

    def set_rotation(self, weight: torch.Tensor) -> None:
        """Set the rotation to an orthonormal `[d, rank]` matrix (e.g. one computed by pyvene), exactly."""
        self.rotate_layer.load_state_dict({"weight": weight.detach()})


@dataclass
class RotatedConfig(InterventionConfig):
    interchange_dim: int | None = None
    subspace_partition: list[list[int]] | None = None


@register("rotated")
class RotatedSpaceIntervention(_RotatedBase):
    """DAS: interchange the addressed dimensions of `x @ R` and rotate back with `R.T`."""

    config_class = RotatedConfig

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.partition = expand_partition(self.config.subspace_partition, self.rank)

    def forward(self, base, source=None, subspaces=None):
        source = _require_source(self, base, source)
        r = self.rotate_layer.weight
        rotated_base, rotated_source = base.to(r.dtype) @ r, source.to(r.dtype) @ r
        mask = dims_mask(subspaces, self.config.interchange_dim, self.partition, self.rank, base.shape[0], base.device)
        return (mix_masked(rotated_base, rotated_source, mask) @ r.T).to(base.dtype)


@dataclass
class LowRankRotatedConfig(RotatedConfig):
    low_rank_dimension: int | None = None


@register("low_rank_rotated")
class LowRankRotatedSpaceIntervention(RotatedSpaceIntervention):
    """DII: `base + ((source - base) @ R) @ R.T` with `R [d, r]` orthonormal columns. Subspaces and
    `interchange_dim` address columns of `R` (pyvene ignores `interchange_dim` here)."""

    config_class = LowRankRotatedConfig

    @property
    def rank(self) -> int:
        r = self.config.low_rank_dimension
        if r is None or not 1 <= r <= self.width:
            raise ConfigError(f"low_rank_rotated needs 1 <= low_rank_dimension <= embed_dim={self.width}, got {r}")
        return int(r)

    def forward(self, base, source=None, subspaces=None):
        source = _require_source(self, base, source)
        r = self.rotate_layer.weight
        diff = (source.to(r.dtype) - base.to(r.dtype)) @ r
        mask = dims_mask(subspaces, self.config.interchange_dim, self.partition, self.rank, base.shape[0], base.device)
        diff = mix_masked(torch.zeros_like(diff), diff, mask)
        return (base.to(r.dtype) + diff @ r.T).to(base.dtype)


class _TemperatureMixin:
    temperature: torch.Tensor

    def set_temperature(self, temperature: float | torch.Tensor) -> None:
        """Set the sigmoid temperature (annealed towards 0 during training to harden the mask)."""
        t = torch.as_tensor(temperature, dtype=self.temperature.dtype).reshape(())
        if not bool(t > 0):
            raise InterventionError(f"temperature must be positive, got {float(t)}")
        self.temperature.copy_(t.to(self.temperature.device))


@dataclass
class BoundlessConfig(InterventionConfig):
    """`init_boundary`: fraction of the rotated dimensions interchanged at the start (clamped to [1e-3, 1]).
    `lower_boundary`: where the mask rises; pyvene puts it at 0, which leaves rotated dimension 0 at most half
    interchanged; -0.5 centres it between dimensions so a boundary of 1 interchanges everything."""

    init_boundary: float = 0.5
    init_temperature: float = 50.0
    lower_boundary: float = 0.0


@register("boundless_rotated")
class BoundlessRotatedSpaceIntervention(_TemperatureMixin, _RotatedBase):
    """Boundless DAS: a soft mask over the rotated dimensions, learned through its boundary."""

    config_class = BoundlessConfig

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.intervention_boundaries = nn.Parameter(torch.tensor([float(self.config.init_boundary)]))
        self.register_buffer("temperature", torch.tensor(float(self.config.init_temperature)))

    def set_intervention_boundaries(self, boundary: float) -> None:
        with torch.no_grad():
            self.intervention_boundaries.fill_(float(boundary))

    def boundary_mask(self) -> torch.Tensor:
        """The soft mask `[d]` over the rotated dimensions."""
        index = torch.arange(self.width, dtype=self.temperature.dtype, device=self.temperature.device)
        upper = torch.clamp(self.intervention_boundaries, 1e-3, 1)[0] * self.width
        t = self.temperature
        return torch.sigmoid((index - self.config.lower_boundary) / t) * torch.sigmoid((upper - index) / t)

    def forward(self, base, source=None, subspaces=None):
        return self.soft_interchange(base, source, subspaces, self.boundary_mask)


@dataclass
class SigmoidMaskConfig(InterventionConfig):
    """The mask logits start at `init_mask` (pyvene: 100 rotated, 0 unrotated) with `init_temperature`."""

    init_mask: float = 100.0
    init_temperature: float = 50.0


@register("sigmoid_mask_rotated")
class SigmoidMaskRotatedSpaceIntervention(_TemperatureMixin, _RotatedBase):
    """Interchange `sigmoid(masks / T)` of every rotated dimension."""

    config_class = SigmoidMaskConfig

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.masks = nn.Parameter(torch.full((self.width,), float(self.config.init_mask)))
        self.register_buffer("temperature", torch.tensor(float(self.config.init_temperature)))

    def forward(self, base, source=None, subspaces=None):
        return self.soft_interchange(base, source, subspaces, lambda: torch.sigmoid(self.masks / self.temperature))


@dataclass
class PlainSigmoidMaskConfig(SigmoidMaskConfig):
    init_mask: float = 0.0
    init_temperature: float = 0.01


@register("sigmoid_mask")
class SigmoidMaskIntervention(_TemperatureMixin, Intervention):
    """Interchange `sigmoid(mask / T)` of every dimension, in the model's own basis."""

    config_class = PlainSigmoidMaskConfig
    source = "required"

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.width = _require_width(self)
        self.mask = nn.Parameter(torch.full((self.width,), float(self.config.init_mask)))
        self.register_buffer("temperature", torch.tensor(float(self.config.init_temperature)))

    def forward(self, base, source=None, subspaces=None):
        if subspaces is not None:
            raise InterventionError("sigmoid_mask learns which dimensions to interchange and takes no subspaces")
        source = _require_source(self, base, source)
        mask = torch.sigmoid(self.mask / self.temperature).to(base.dtype)
        return (1.0 - mask) * base + mask * source.to(base.dtype)


@dataclass
class PCAConfig(RotatedConfig):
    """`n_components`: rows of the PCA basis (None = embed_dim)."""

    n_components: int | None = None


@register("pca_rotated")
class PCARotatedSpaceIntervention(Intervention):
    """Interchange in a fixed PCA basis: standardise with (mean, std), project on the components, interchange the
    addressed components, project back and un-standardise. Until `fit` or loaded weights, the basis is the
    standard one (mean 0, std 1, identity components)."""

    config_class = PCAConfig
    source = "required"

    def __init__(self, config=None, components: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, **kw: Any):
        if components is not None:
            kw.setdefault("n_components", int(components.shape[0]))
            kw.setdefault("embed_dim", int(components.shape[1]))
        super().__init__(config, **kw)
        d = _require_width(self)
        n = self.config.n_components if self.config.n_components is not None else d
        if not 1 <= n <= d:
            raise ConfigError(f"pca_rotated needs 1 <= n_components <= embed_dim={d}, got {n}")
        self.width, self.n_components = d, int(n)
        self.partition = expand_partition(self.config.subspace_partition, self.n_components)
        self.register_buffer("pca_components", torch.eye(self.n_components, d))
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_std", torch.ones(d))
        if components is not None or mean is not None or std is not None:
            self.set_basis(components, mean, std)

    def set_basis(self, components=None, mean=None, std=None) -> None:
        """Replace any of the basis tensors (shapes `[n_components, d]`, `[d]`, `[d]`)."""
        for name, value in (("pca_components", components), ("pca_mean", mean), ("pca_std", std)):
            if value is None:
                continue
            current = getattr(self, name)
            value = torch.as_tensor(value).detach()
            if tuple(value.shape) != tuple(current.shape):
                raise InterventionError(f"pca_rotated: {name} must be {tuple(current.shape)}, got {tuple(value.shape)}")
            current.copy_(value.to(current.dtype))
        if bool((self.pca_std == 0).any()):
            raise InterventionError("pca_rotated: pca_std has zeros; a constant dimension cannot be standardised")

    @torch.no_grad()
    def fit(self, activations: torch.Tensor) -> "PCARotatedSpaceIntervention":
        """Fit mean, std (population) and the top `n_components` principal axes of the standardised activations
        `[..., d]`. Constant dimensions get std 1. Each axis is signed so its largest entry is positive."""
        x = activations.detach().reshape(-1, activations.shape[-1]).to(torch.float64)
        if x.shape[-1] != self.width:
            raise InterventionError(f"pca_rotated.fit expects vectors of width {self.width}, got {x.shape[-1]}")
        if x.shape[0] < self.n_components:
            raise InterventionError(f"pca_rotated.fit needs >= n_components={self.n_components} vectors, got {len(x)}")
        mean, std = x.mean(0), x.std(0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        z = (x - mean) / std
        z = z - z.mean(0)
        _, _, vh = torch.linalg.svd(z, full_matrices=False)
        comps = vh[: self.n_components]
        pivot = comps.abs().argmax(dim=1, keepdim=True)
        comps = comps * torch.sign(comps.gather(1, pivot))
        self.set_basis(comps, mean, std)
        return self

    def forward(self, base, source=None, subspaces=None):
        source = _require_source(self, base, source)
        c, mean, std = self.pca_components, self.pca_mean, self.pca_std
        rotated_base = ((base.to(c.dtype) - mean) / std) @ c.T
        rotated_source = ((source.to(c.dtype) - mean) / std) @ c.T
        mask = dims_mask(subspaces, self.config.interchange_dim, self.partition, self.n_components,
                         base.shape[0], base.device)
        out = mix_masked(rotated_base, rotated_source, mask) @ c
        return (out * std + mean).to(base.dtype)
