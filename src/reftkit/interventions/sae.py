"""Interventions in the latent space of a sparse autoencoder: interchange latents between base and source.

- `autoencoder`: a one-layer ReLU autoencoder, `encode(x) = relu(W_e (x - b_d) + b_e)`, `decode(z) = W_d z + b_d`
  (pyvene's `AutoencoderLayer`, same state-dict keys `autoencoder.encoder.0.weight`, ...).
- `jumprelu_sae`: a JumpReLU SAE as released in Gemma Scope, `z = (pre > threshold) * relu(pre)` with
  `pre = x @ W_enc + b_enc`, `decode(z) = z @ W_dec + b_dec`; `load_weights` reads Gemma Scope's `params.npz`
  (or a safetensors file or a dict) with the names `W_enc, b_enc, threshold, W_dec, b_dec`.

Decisions:
- Both encode base and source, take the source's values on the addressed latents and decode, as pyvene 0.1.8
  does. The output is the reconstruction, so even with no latent addressed the vectors change by the
  reconstruction error. `preserve_error=True` adds the base's error `x - decode(encode(x))` back, so that
  only the interchanged latents move the vectors (default off, pyvene's behaviour).
- Latents are addressed like rotated dimensions (see `das.py`): `interchange_dim` = the first k latents, or per
  call `subspaces`, optionally through `subspace_partition`. pyvene's `AutoencoderIntervention` instead indexes
  the latents with `interchange_dim` itself (`z[..., interchange_dim]`); pass those indices as `subspaces` here.
  pyvene's JumpReLU default addresses the first `embed_dim` latents; here the default is all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, InterventionError
from .base import Intervention, InterventionConfig, register
from .das import dims_mask, expand_partition, mix_masked


@dataclass
class AutoencoderConfig(InterventionConfig):
    """`latent_dim`: width of the latent space. `interchange_dim`/`subspace_partition` address latents."""

    latent_dim: int | None = None
    interchange_dim: int | None = None
    subspace_partition: list[list[int]] | None = None
    preserve_error: bool = False


class _LatentInterchange(Intervention):
    """Encode base and source, interchange the addressed latents, decode (+ the base's error if asked).
    Subclasses own the weights and define `encode(x)` and `decode(z)`."""

    config_class = AutoencoderConfig
    source = "required"

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        d, m = self.config.embed_dim, self.config.latent_dim
        if d is None or m is None or d < 1 or m < 1:
            raise ConfigError(f"{self.type_name} needs embed_dim and latent_dim, got {d} and {m}")
        self.width, self.latent_width = int(d), int(m)
        self.partition = expand_partition(self.config.subspace_partition, self.latent_width)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, base, source=None, subspaces=None):
        if source is None:
            raise InterventionError(f"{self.type_name} interchanges latents with a source; pass source vectors")
        if source.shape != base.shape:
            raise InterventionError(f"{self.type_name}: source {tuple(source.shape)} != base {tuple(base.shape)}")
        if base.shape[-1] != self.width:
            raise InterventionError(f"{self.type_name} expects vectors of width {self.width}, got {base.shape[-1]}")
        x = base.to(self._dtype())
        base_latent, source_latent = self.encode(x), self.encode(source.to(x.dtype))
        mask = dims_mask(subspaces, self.config.interchange_dim, self.partition, self.latent_width,
                         base.shape[0], base.device)
        out = self.decode(mix_masked(base_latent, source_latent, mask))
        if self.config.preserve_error:
            out = out + (x - self.decode(base_latent))
        return out.to(base.dtype)


@register("autoencoder")
class AutoencoderIntervention(_LatentInterchange):
    """A one-layer ReLU autoencoder (encoder `Linear + ReLU`, decoder `Linear`); the decoder bias is
    subtracted before encoding."""

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.autoencoder = nn.Module()
        self.autoencoder.encoder = nn.Sequential(nn.Linear(self.width, self.latent_width), nn.ReLU())
        self.autoencoder.decoder = nn.Sequential(nn.Linear(self.latent_width, self.width))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encoder(x - self.autoencoder.decoder[0].bias)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decoder(z)


SAE_WEIGHT_NAMES = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


@register("jumprelu_sae")
class JumpReLUSAEIntervention(_LatentInterchange):
    """JumpReLU SAE (Gemma Scope layout: `W_enc [d, m]`, `b_enc [m]`, `threshold [m]`, `W_dec [m, d]`, `b_dec [d]`).

    Until weights are loaded it is a tied random SAE (unit-norm decoder rows, `W_enc = W_dec.T`, zero biases and
    thresholds), usable for tests and as a starting point."""

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        d, m = self.width, self.latent_width
        w_dec = torch.nn.functional.normalize(torch.randn(m, d), dim=-1)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.threshold = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        return (pre > self.threshold) * torch.relu(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    @staticmethod
    def read_weights(weights: Mapping[str, Any] | str | os.PathLike) -> dict[str, torch.Tensor]:
        """Read `W_enc, b_enc, threshold, W_dec, b_dec` from a dict, an `.npz` or a `.safetensors` file."""
        if isinstance(weights, (str, os.PathLike)):
            path = Path(weights)
            if not path.is_file():
                raise ConfigError(f"SAE weights file {path} does not exist")
            if path.suffix == ".npz":
                import numpy as np

                with np.load(path, allow_pickle=False) as npz:
                    weights = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file

                weights = load_file(str(path))
            else:
                raise ConfigError(f"SAE weights must be a .npz or .safetensors file, got {path.name}")
        missing = [k for k in SAE_WEIGHT_NAMES if k not in weights]
        unknown = sorted(set(weights) - set(SAE_WEIGHT_NAMES))
        if missing or unknown:
            raise ConfigError(
                f"JumpReLU SAE weights need exactly {list(SAE_WEIGHT_NAMES)}; missing {missing}, unknown {unknown}"
            )
        return {k: torch.as_tensor(weights[k]) for k in SAE_WEIGHT_NAMES}

    @classmethod
    def from_weights(cls, weights: Mapping[str, Any] | str | os.PathLike, **kw: Any) -> "JumpReLUSAEIntervention":
        """Build one sized after the weights (`embed_dim`, `latent_dim` read from `W_enc`) and load them."""
        tensors = cls.read_weights(weights)
        d, m = tensors["W_enc"].shape
        sae = cls(embed_dim=int(d), latent_dim=int(m), **kw)
        sae.load_weights(tensors)
        return sae

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, Any] | str | os.PathLike) -> "JumpReLUSAEIntervention":
        """Copy Gemma-Scope-style weights into this SAE, checking every shape first."""
        tensors = self.read_weights(weights)
        for name, value in tensors.items():
            current = getattr(self, name)
            if tuple(value.shape) != tuple(current.shape):
                raise InterventionError(
                    f"jumprelu_sae: {name} has shape {tuple(value.shape)}, this SAE expects {tuple(current.shape)} "
                    f"(embed_dim={self.width}, latent_dim={self.latent_width})"
                )
        for name, value in tensors.items():
            getattr(self, name).copy_(value.to(getattr(self, name).dtype))
        return self
