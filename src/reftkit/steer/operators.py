"""Steering operators: how a `SteeringVector`'s direction at one site becomes one engine intervention.

Every operator is a registered reftkit intervention (basic.py's `add`, the rest in `interventions/steering.py`),
so a steered model saves and loads like any other bound intervention. `k` is the raw multiplier of the direction
`v` that the coefficient converts to (see `vector.py`), `r̂ = v / ‖v‖`:

| operator | formula | operator_config keys |
| --- | --- | --- |
| `add` | `h + k·v` (`v [d]`); ActAdd's `v [T, d]`: `h[t] + k·v[t]` on the first T prompt tokens | `norm_preserving` |
| `ablate` | `h − k·r̂r̂ᵀh` (k = 1: directional ablation) | `norm_preserving` |
| `clamp` | `h − r̂r̂ᵀ(h − b) + k·value·r̂`; `value` defaults to ‖v‖, `b` (`bias`) to 0. ACE is `b = r⁻`, `k = α` | `value`, `bias`, `norm_preserving` |
| `ablate_then_add` | `h − r̂r̂ᵀh + k·v` | `norm_preserving` |
| `neuron_fill` | `h[i] ← k·v[i]` on the neurons `i` | `neurons`, `norm_preserving` |
| `neuron_add` | `h[i] ← h[i] + k·v[i]` | `neurons`, `norm_preserving` |
| `neuron_scale` | `h[i] ← k·v[i]·h[i]` | `neurons`, `norm_preserving` |

The neuron operators read the values of the listed neurons `i` (`neurons`: a list of indices, or a long tensor)
from the direction, so a language vector on `L3.mlp_activation` is a dense `[d_mlp]` tensor plus its index set. A
head-level add is `add` at a `head_*` site (`L3.H1.head_attention_value_output`, a `[d_head]` direction).
`norm_preserving: true` wraps the edit so each edited vector keeps its original length. A config value may be
a dict keyed by the vector's sites (`{"bias": {"L6.block_output": tensor}}`); each site sees its own entry.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import ConfigError
from ..interventions.base import Intervention
from ..interventions.basic import AddIntervention
from ..interventions.steering import (AblateIntervention, AblateThenAddIntervention, ClampIntervention,
                                      NeuronAddIntervention, NeuronFillIntervention, NeuronScaleIntervention,
                                      NormPreservingIntervention, PositionalAddIntervention)

_NEURONS = {"neuron_fill": NeuronFillIntervention, "neuron_add": NeuronAddIntervention,
            "neuron_scale": NeuronScaleIntervention}
CONFIG_KEYS = {"add": {"norm_preserving"}, "ablate": {"norm_preserving"},
               "clamp": {"value", "bias", "norm_preserving"}, "ablate_then_add": {"norm_preserving"},
               **{name: {"neurons", "norm_preserving"} for name in _NEURONS}}
OPERATORS = tuple(CONFIG_KEYS)


def build_operator(operator: str, direction: torch.Tensor, k: float, config: dict | None = None,
                   site: str = "?") -> Intervention:
    """The intervention applying `direction` with multiplier `k` under `operator` (see the module table)."""
    config = dict(config or {})
    where = f"operator {operator!r} at {site}"
    if operator not in CONFIG_KEYS:
        raise ConfigError(f"unknown steering operator {operator!r}; expected one of {', '.join(OPERATORS)}")
    unknown = set(config) - CONFIG_KEYS[operator]
    if unknown:
        raise ConfigError(f"{where}: unknown operator_config key(s) {sorted(unknown)}; expected some of "
                          f"{sorted(CONFIG_KEYS[operator])}")
    preserve = config.get("norm_preserving", False)
    if not isinstance(preserve, bool):
        raise ConfigError(f"{where}: norm_preserving must be true or false, got {preserve!r}")
    if operator == "add":
        if direction.dim() == 2:
            iv = PositionalAddIntervention(vectors=direction, coefficient=k)
        else:
            iv = AddIntervention(vector=direction, coefficient=k)
    elif operator == "ablate":
        iv = AblateIntervention(direction=direction, coefficient=k)
    elif operator == "ablate_then_add":
        iv = AblateThenAddIntervention(direction=direction, coefficient=k)
    elif operator == "clamp":
        value = config.get("value", float(direction.norm()))
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"{where}: value must be a finite number, got {value!r}")
        bias = config.get("bias")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != direction.shape):
            raise ConfigError(f"{where}: bias must be a tensor {tuple(direction.shape)} like the direction, got "
                              f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        iv = ClampIntervention(direction=direction, bias=bias, value=k * float(value))
    else:
        neurons = config.get("neurons")
        if neurons is None:
            raise ConfigError(f"{where}: operator_config needs 'neurons', the indices of the neurons to edit")
        try:
            index = torch.as_tensor(neurons)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{where}: neurons must be a list of integer indices: {e}") from None
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool or not index.numel():
            raise ConfigError(f"{where}: neurons must be a non-empty 1-D list of integer indices")
        if int(index.min()) < 0 or int(index.max()) >= direction.shape[-1]:
            raise ConfigError(f"{where}: neuron indices must lie in 0..{direction.shape[-1] - 1}")
        index = index.long()
        iv = _NEURONS[operator](neurons=index, values=direction[index], coefficient=k,
                                embed_dim=int(direction.shape[-1]))
    if preserve:
        iv = NormPreservingIntervention(inner=iv)
    return iv
