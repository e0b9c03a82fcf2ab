"""The intervention contract, its config, and the registry of names.

An intervention is an `nn.Module` that maps the selected vectors `base [batch, K, width]` (and, for interchange
types, the matching `source [batch, K, width]`) to new vectors of the same shape. It never sees sites, positions
or hooks: the engine gathers and scatters. Its constructor arguments live in a dataclass config, so an
intervention is fully described by `{"type": <registry name>, "config": {...}}` plus its safetensors weights.
Classes are found through `REGISTRY` by name, never by importing a path named in a file.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, InterventionError

REGISTRY: dict[str, type["Intervention"]] = {}


def register(name: str):
    """Class decorator: make an intervention buildable from its registry name."""

    def wrap(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ConfigError(f"intervention type {name!r} is registered twice")
        cls.type_name = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass
class InterventionConfig:
    """`embed_dim`: width of the vectors the intervention acts on (None = fixed by the first input seen)."""

    embed_dim: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**d)


class Intervention(nn.Module, metaclass=abc.ABCMeta):
    """Base class. Subclasses set `config_class`, implement `forward(base, source=None)`, and may set:

    - `source`: "none" (default), "required" (interchange types) or "module_input" (the engine passes the hooked
      module's input at the same positions, e.g. for `skip`);
    - `collects`: the engine records the selected vectors and leaves the model untouched.
    """

    type_name: ClassVar[str] = ""
    config_class: ClassVar[type[InterventionConfig]] = InterventionConfig
    source: ClassVar[str] = "none"
    collects: ClassVar[bool] = False

    def __init__(self, config: InterventionConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def embed_dim(self) -> int | None:
        return self.config.embed_dim

    @abc.abstractmethod
    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces=None) -> torch.Tensor:
        """New vectors for the selected `base [batch, K, width]`; same shape."""

    def check_input(self, base: torch.Tensor, source: torch.Tensor | None, where: str) -> None:
        """Raise a typed error naming the site when the inputs do not fit this intervention."""
        d = self.config.embed_dim
        if d is not None and base.shape[-1] != d:
            raise InterventionError(
                f"{self.type_name} at {where} expects vectors of width {d}, got {base.shape[-1]}"
                " (check the site's component and the intervention's embed_dim)"
            )
        if self.source == "required":
            if source is None:
                raise InterventionError(
                    f"{self.type_name} at {where} needs a source; pass sources=[...] or source_representations=..."
                )
            if source.shape != base.shape:
                raise InterventionError(
                    f"{self.type_name} at {where}: source vectors {tuple(source.shape)} do not match base "
                    f"{tuple(base.shape)}; sources need the same batch size and number of positions"
                )
        p = next(iter(self.parameters()), None)
        if p is not None and torch.is_floating_point(p):
            if p.device != base.device:
                raise InterventionError(
                    f"{self.type_name} at {where} lives on {p.device} but the model's activations are on "
                    f"{base.device}; move it with .to(device)"
                )

    # ---- description ----------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"type": self.type_name, "config": self.config.to_dict()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())


def build_intervention(spec: dict) -> Intervention:
    """Build an intervention from `{"type": name, "config": {...}}` (weights are loaded separately)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"an intervention spec is {{'type': name, 'config': {{...}}}}, got {spec!r}")
    cls = REGISTRY.get(spec["type"])
    if cls is None:
        raise ConfigError(f"unknown intervention type {spec['type']!r}; registered: {', '.join(sorted(REGISTRY))}")
    return cls(cls.config_class.from_dict(dict(spec.get("config", {}))))


def intervention_types() -> list[str]:
    return sorted(REGISTRY)


def subspace_mix(base: torch.Tensor, other: torch.Tensor, subspaces: torch.Tensor | None,
                 interchange_dim: int | None) -> torch.Tensor:
    """Take `other` on the addressed dimensions and `base` elsewhere.

    `subspaces`: LongTensor of dimension indices, `[S]` for the whole batch or `[batch, S]` per example;
    otherwise the first `interchange_dim` dimensions (all when None). Out of place, so autograd is safe.
    """
    if subspaces is None:
        if interchange_dim is None or interchange_dim >= base.shape[-1]:
            return other
        return torch.cat([other[..., :interchange_dim], base[..., interchange_dim:]], dim=-1)
    sub = subspaces.to(base.device)
    mask = torch.zeros(base.shape[-1], dtype=torch.bool, device=base.device)
    if sub.dim() == 1:
        mask = mask.index_fill(0, sub, True)
        return torch.where(mask, other, base)
    if sub.shape[0] != base.shape[0]:
        raise InterventionError(f"per-example subspaces have batch {sub.shape[0]}, the activations {base.shape[0]}")
    m = torch.zeros(base.shape[0], base.shape[-1], dtype=torch.bool, device=base.device).scatter(1, sub, True)
    m = m.view(base.shape[0], *([1] * (base.dim() - 2)), base.shape[-1])
    return torch.where(m, other, base)
