"""The low-rank orthogonal factor shared by ReFT and DAS interventions.

`orthogonal_low_rank(d, r)` is a module whose `weight [d, r]` keeps orthonormal columns under training (torch's
orthogonal parametrization: Householder with dynamic trivialization, as pyreft and pyvene use). Its state dict
holds the computed `weight` only, not the parametrization's `d x d` base buffer; loading rebuilds a
trivialization that reproduces the saved matrix exactly (`trivialization_for`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..errors import InterventionError


class LowRankRotation(nn.Module):
    """Holds `weight [d, r]`, initialised with orthonormal columns; see `orthogonal_low_rank`."""

    def __init__(self, embed_dim: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(embed_dim, rank, dtype=dtype)))


def orthogonal_low_rank(embed_dim: int, rank: int, dtype: torch.dtype) -> LowRankRotation:
    """A `LowRankRotation` whose weight stays orthonormal under training, with a compact state dict."""
    layer = orthogonal(LowRankRotation(embed_dim, rank, dtype))
    layer.register_state_dict_post_hook(_save_computed_rotation)
    layer.register_load_state_dict_pre_hook(_load_computed_rotation)
    return layer


def _save_computed_rotation(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "parametrizations.")]:
        del state_dict[key]
    state_dict[prefix + "weight"] = module.weight.detach()


def _load_computed_rotation(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return  # a full parametrization state (original + base) loads as it is
    weight = state_dict.pop(key)
    original, base = trivialization_for(weight, module.parametrizations.weight.original)
    state_dict[prefix + "parametrizations.weight.original"] = original
    state_dict[prefix + "parametrizations.weight.0.base"] = base


@torch.no_grad()
def trivialization_for(weight: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(original, base)` of torch's trivialized Householder parametrization whose matrix is `weight [d, r]`.

    `base` is a `d x d` orthogonal matrix whose first r columns are `weight` itself, completed deterministically
    (QR of `weight` next to a seeded Gaussian block, no global RNG draw); `original` has -1 on its diagonal, for
    which the Householder product is the identity's first r columns. The matrix is therefore reproduced exactly.
    """
    if tuple(weight.shape) != tuple(like.shape):
        raise InterventionError(f"rotation weight must have shape {tuple(like.shape)}, got {tuple(weight.shape)}")
    w = weight.detach().to(like.device, torch.float64)
    d, r = w.shape
    if not torch.allclose(w.T @ w, torch.eye(r, dtype=w.dtype, device=w.device), atol=1e-4):
        raise InterventionError("the rotation's columns must be orthonormal (weight.T @ weight = I)")
    gen = torch.Generator(device="cpu").manual_seed(0)
    filler = torch.randn(d, d - r, generator=gen, dtype=torch.float64).to(w.device)
    q, tri = torch.linalg.qr(torch.cat([w, filler], dim=1))
    signs = torch.where(tri.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    base = (q * signs).to(like.dtype)
    base[:, :r] = weight.detach().to(like.device, like.dtype)
    original = torch.zeros_like(like)
    original.diagonal().fill_(-1.0)
    return original, base
