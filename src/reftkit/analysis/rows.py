"""What both sweep evaluators (the engine's, sweep.py, and the replay, replay.py) share: the rows of a sweep,
the embedding noise of causal tracing and how it is bound, and reading last-token logits. Its own module so that
sweep.py can choose the replay and the replay can use these without importing sweep.py."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..engine import Binding
from ..errors import ReftkitError
from ..interventions.basic import AddIntervention
from ..positions import Positions


@dataclass
class SweepRows:
    """One row per run. `component` indexes the sweep's component list; layers are inclusive."""

    base: torch.Tensor
    position: torch.Tensor
    component: torch.Tensor
    first_layer: torch.Tensor
    last_layer: torch.Tensor

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def take(self, index: torch.Tensor) -> "SweepRows":
        return SweepRows(self.base[index], self.position[index], self.component[index], self.first_layer[index],
                         self.last_layer[index])

    @classmethod
    def grid(cls, n_base: int, n_components: int, layers, positions, window: "int | list[int]" = 1,
             n_layers: int | None = None) -> "SweepRows":
        """Every (base row, component, layer, position), in that order. `window[c]` layers are replaced around
        each layer for component `c`: `[l - w // 2, l - w // 2 + w)`, clipped to the model (Meng et al.)."""
        layers = torch.as_tensor(list(layers), dtype=torch.long)
        positions = torch.as_tensor(list(positions), dtype=torch.long)
        windows = [window] * n_components if isinstance(window, int) else list(window)
        b, c, l, t = torch.meshgrid(torch.arange(n_base), torch.arange(n_components), layers, positions,
                                    indexing="ij")
        w = torch.as_tensor(windows, dtype=torch.long)[c]
        first = (l - w // 2).clamp(min=0)
        last = l - w // 2 + w - 1
        if n_layers is not None:
            last = last.clamp(max=n_layers - 1)
        return cls(b.reshape(-1), t.reshape(-1), c.reshape(-1), first.reshape(-1), last.reshape(-1))


@dataclass
class EmbeddingNoise:
    """Noise added to the embedding output: `values [n_base, K, d]` at token `positions [K]`."""

    positions: torch.Tensor
    values: torch.Tensor


def forward_kwargs(model) -> dict:
    """Ask a causal LM for the last position's logits only, when its forward supports it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def last_logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ReftkitError("the model returned no logits; patching and tracing need a causal language model "
                           "(load it with task='causal-lm')")
    return logits[:, -1].float()


def noise_binding(noise: EmbeddingNoise | None) -> list[Binding]:
    return [] if noise is None else [Binding("embedding", AddIntervention(), name="embedding_noise")]


def noise_kwargs(noise: EmbeddingNoise | None, base: torch.Tensor) -> dict:
    if noise is None:
        return {}
    return {"positions": {"embedding_noise": Positions.indices(noise.positions)},
            "source_representations": {"embedding_noise": noise.values[base]}}


def with_progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
