"""ReFT interventions (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models") and RED.

Each type adds a learned edit to the selected hidden vectors `h [batch, K, d]`; the class docstrings give the
formulas. `R` is the paper's `r x d` matrix with orthonormal rows; like pyreft, it is stored transposed as
`rotate_layer.weight [d, r]` (orthonormal columns) and applied as `h @ weight`.

Decisions:
- Parameter and state-dict names follow pyreft 0.1.0 (`rotate_layer`, `learned_source`, `proj_layer`), so a pyreft
  checkpoint maps onto these modules key for key (see `reftkit.io_pyreft`).
- `R` is torch's orthogonal parametrization (Householder with dynamic trivialization, torch's default for a
  rectangular matrix and pyreft's choice), so the gradients on its raw parameter match pyreft's. The
  parametrization is evaluated once per forward and that one `R` serves both projections; pyreft evaluates it
  twice per forward.
- Parameters live in `config.dtype` (float32 by default) whatever the model's dtype: the edit is computed in that
  dtype and `h + edit` is rounded once to the dtype of `h`. Move an intervention with `.to(device)`; a dtype cast
  such as `.to(torch.bfloat16)` would cast `R` too, and torch's orthogonal parametrization needs float32/float64.
- Dropout acts on the edit only, `h + dropout(edit)`: in training it never perturbs the frozen model's own
  representation. `dropout_on="output"` reproduces pyreft's `dropout(h + edit)`.
- The state dict holds the computed `R` (`rotate_layer.weight`, `d x r`) rather than the parametrization's tensors,
  whose `base` buffer is `d x d` (64 MB at d = 4096). Loading rebuilds a trivialization whose `R` is exactly the
  saved one. Optimizer moments of the raw parameter therefore do not carry over a save/load cycle.
- `subspaces` are not supported: every type edits its whole learned rank-r subspace.
- Weight decay must skip the raw rotation parameter (`no_weight_decay()`), or `R` collapses; see there.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InterventionError
from .base import Intervention, InterventionConfig, register
from .rotation import orthogonal_low_rank, trivialization_for  # noqa: F401  (re-exported)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ROTATION_DTYPES = ("float32", "float64")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
}
"""Activations for the learned source, by the names transformers' `ACT2FN` (and so pyreft's `act_fn`) uses."""

DROPOUT_PLACES = ("edit", "output")


@dataclass
class ReftConfig(InterventionConfig):
    """`low_rank_dimension`: the rank r of the edited subspace. `dropout`: probability, applied to the edit
    (`dropout_on="edit"`) or, as in pyreft, to the whole output (`"output"`). `dtype`: the dtype of the
    parameters and of the edit's computation (float32 or float64 when the type has a rotation)."""

    low_rank_dimension: int | None = None
    dropout: float = 0.0
    dropout_on: str = "edit"
    dtype: str = "float32"


@dataclass
class LinearSourceConfig(ReftConfig):
    """`act_fn`: activation applied to the learned source `Wh + b` (a name of `ACTIVATIONS`; None = linear)."""

    act_fn: str | None = None


@dataclass
class NoreftConfig(LinearSourceConfig):
    """`add_bias`: give the projection `W2 h` its own bias (pyreft's `add_bias`)."""

    add_bias: bool = False


@dataclass
class RedConfig(InterventionConfig):
    """RED has no rank: one scale and one bias per dimension."""

    dropout: float = 0.0
    dropout_on: str = "edit"
    dtype: str = "float32"


def _validate(config: InterventionConfig, type_name: str, *, rank: bool, rotation: bool) -> None:
    d = config.embed_dim
    if d is None or int(d) < 1:
        raise ConfigError(f"{type_name} needs embed_dim, the width of the vectors it edits (the model's hidden size)")
    if rank:
        r = config.low_rank_dimension
        if r is None or int(r) < 1:
            raise ConfigError(f"{type_name} needs low_rank_dimension >= 1 (the rank of the edited subspace), got {r}")
        if int(r) > int(d):
            raise ConfigError(
                f"{type_name}: low_rank_dimension {r} is larger than embed_dim {d}; the rank of the edited subspace "
                "can be at most the width of the vectors"
            )
    if not 0.0 <= float(config.dropout) <= 1.0:
        raise ConfigError(f"{type_name}: dropout must be a probability in [0, 1], got {config.dropout}")
    if config.dropout_on not in DROPOUT_PLACES:
        raise ConfigError(f"{type_name}: dropout_on must be one of {DROPOUT_PLACES}, got {config.dropout_on!r}")
    allowed = ROTATION_DTYPES if rotation else tuple(DTYPES)
    if config.dtype not in allowed:
        why = " (torch's orthogonal parametrization needs full precision)" if rotation else ""
        raise ConfigError(f"{type_name}: dtype must be one of {allowed}{why}, got {config.dtype!r}")
    act = getattr(config, "act_fn", None)
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"{type_name}: unknown act_fn {act!r}; choose one of {sorted(ACTIVATIONS)} or None")


class _ReftBase(Intervention):
    """Shared construction, validation and the final `h + edit` with dropout. Subclasses implement `edit(x)`,
    where `x` is the base cast to the parameters' dtype, and set `has_rank` / `has_rotation`."""

    config_class: Any = ReftConfig
    has_rank = True
    has_rotation = True

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        _validate(self.config, self.type_name, rank=self.has_rank, rotation=self.has_rotation)
        self.param_dtype = DTYPES[self.config.dtype]
        self.dropout = nn.Dropout(float(self.config.dropout))
        act = getattr(self.config, "act_fn", None)
        self.act_fn = ACTIVATIONS["linear" if act is None else act]
        if self.has_rotation:
            self.rotate_layer = orthogonal_low_rank(self.width, self.rank, self.param_dtype)

    @property
    def width(self) -> int:
        return int(self.config.embed_dim)

    @property
    def rank(self) -> int:
        return int(self.config.low_rank_dimension)

    @property
    def rotation(self) -> torch.Tensor:
        """The current `weight [d, r]` (= R transposed), computed from the parametrization."""
        return self.rotate_layer.weight

    def set_rotation(self, weight: torch.Tensor) -> None:
        """Set `R` from a `[d, r]` matrix with orthonormal columns (e.g. pyreft's saved `rotate_layer`)."""
        original = self.rotate_layer.parametrizations.weight.original
        new_original, base = trivialization_for(weight, original)
        with torch.no_grad():
            original.copy_(new_original)
            self.rotate_layer.parametrizations.weight[0].base = base

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters an optimizer must not decay. The diagonal of torch's raw orthogonal parameter
        holds signs that it reads through `.int()`: weight decay (AdamW's, for one) turns -1 into -0.99..., read
        as 0, and `R` collapses to zero after a single step."""
        return {"rotate_layer.parametrizations.weight.original"} if self.has_rotation else set()

    @abc.abstractmethod
    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """The learned edit for `x`, in the parameters' dtype."""

    def forward(self, base, source=None, subspaces=None):
        if subspaces is not None:
            raise InterventionError(
                f"{self.type_name} edits its whole learned subspace and takes no subspaces; lower "
                "low_rank_dimension or use separate interventions instead"
            )
        x = base.to(self.param_dtype)
        delta = self.edit(x)
        if self.config.dropout_on == "edit":
            return (x + self.dropout(delta)).to(base.dtype)
        return self.dropout((x + delta).to(base.dtype))


@register("loreft")
class LoreftIntervention(_ReftBase):
    """LoReFT: `h + Rᵀ(Wh + b − Rh)`, with `R` (r x d) orthonormal rows and `W, b` a Linear d -> r.

    The edit replaces the projection `Rh` of `h` on the subspace by the learned projected source `Wh + b`
    (optionally through `act_fn`).
    """

    config_class = LinearSourceConfig

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.learned_source = nn.Linear(self.width, self.rank, dtype=self.param_dtype)

    def edit(self, x):
        r = self.rotate_layer.weight  # evaluated once
        rotated = x @ r  # before the source, as pyreft: the same order of gradient accumulation on h
        return (self.act_fn(self.learned_source(x)) - rotated) @ r.T


@register("direft")
class DireftIntervention(_ReftBase):
    """DiReFT: `h + W₂ᵀ(W₁h + b)`, with `W₂` (r x d) free (no orthogonality) and `W₁, b` a Linear d -> r.

    The paper's DiReFT, pyreft's `NodireftIntervention`: LoReFT without the orthogonality constraint and without
    subtracting the projection; in effect LoRA applied to hidden states at chosen positions. `W₂` is
    `proj_layer.weight`; its bias is never used (pyreft creates one when `add_bias`, which does not change the
    output), so this module has none.
    """

    config_class = LinearSourceConfig
    has_rotation = False

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.proj_layer = nn.Linear(self.width, self.rank, bias=False, dtype=self.param_dtype)
        self.learned_source = nn.Linear(self.width, self.rank, dtype=self.param_dtype)

    def edit(self, x):
        return self.act_fn(self.learned_source(x)) @ self.proj_layer.weight


@register("orthogonal_direft")
class OrthogonalDireftIntervention(_ReftBase):
    """Orthogonal DiReFT: `h + Rᵀ(Wh + b)`, with `R` (r x d) orthonormal rows and `W, b` a Linear d -> r.

    pyreft's `DireftIntervention` ("direct edit ReFT"): LoReFT without subtracting the projection `Rh`.
    """

    config_class = LinearSourceConfig

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.learned_source = nn.Linear(self.width, self.rank, dtype=self.param_dtype)

    def edit(self, x):
        return self.act_fn(self.learned_source(x)) @ self.rotate_layer.weight.T


@register("noreft")
class NoreftIntervention(_ReftBase):
    """NoReFT: `h + W₂ᵀ(W₁h + b − W₂h)`, LoReFT with a free `W₂` (r x d) in place of `R` (pyreft's
    `NoreftIntervention`). With `add_bias`, `W₂h` carries its own bias `b₂`: `h + W₂ᵀ(W₁h + b − W₂h − b₂)`."""

    config_class = NoreftConfig
    has_rotation = False

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.proj_layer = nn.Linear(self.width, self.rank, bias=bool(self.config.add_bias), dtype=self.param_dtype)
        self.learned_source = nn.Linear(self.width, self.rank, dtype=self.param_dtype)

    def edit(self, x):
        projected = self.proj_layer(x)  # before the source, as pyreft
        return (self.act_fn(self.learned_source(x)) - projected) @ self.proj_layer.weight


@register("consreft")
class ConsreftIntervention(_ReftBase):
    """ConsReFT: `h + Rᵀ(b − Rh)`, with `R` (r x d) orthonormal rows and a learned constant `b` (r): the projection
    on the subspace is set to `b` for every input (pyreft's `ConsreftIntervention`; `b` starts uniform in
    [0, 1) as there). pyreft applies no dropout to this type; the default dropout 0 matches it."""

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.learned_source = nn.Parameter(torch.rand(self.rank, dtype=self.param_dtype))

    def edit(self, x):
        r = self.rotate_layer.weight
        rotated = x @ r
        return (self.learned_source - rotated) @ r.T


@register("lobireft")
class LobireftIntervention(_ReftBase):
    """LobiReFT: `h + Rᵀb`, with `R` (r x d) orthonormal rows and a learned `b` (r): a low-rank BitFit, the same
    shift for every input (pyreft's `LobireftIntervention`; `b` starts uniform in [0, 1) as there)."""

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.learned_source = nn.Parameter(torch.rand(self.rank, dtype=self.param_dtype))

    def edit(self, x):
        return (self.learned_source @ self.rotate_layer.weight.T).expand_as(x)


@register("red")
class RedIntervention(_ReftBase):
    """RED (Wu et al. 2024, "Advancing Parameter Efficiency in Fine-tuning via Representation Editing"):
    `h * s + b`, elementwise, with a learned scale `s` (d) initialised to 1 and bias `b` (d) initialised to 0,
    so a fresh intervention is the identity. The edit is `h * (s - 1) + b`."""

    config_class = RedConfig
    has_rank = False
    has_rotation = False

    def __init__(self, config=None, **kw: Any):
        super().__init__(config, **kw)
        self.scale = nn.Parameter(torch.ones(self.width, dtype=self.param_dtype))
        self.bias = nn.Parameter(torch.zeros(self.width, dtype=self.param_dtype))

    @property
    def rank(self) -> None:
        """RED has no rank: it scales and shifts every dimension."""
        return None

    def edit(self, x):
        return x * (self.scale - 1.0) + self.bias
