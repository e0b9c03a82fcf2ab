"""Batched site sweeps: many single-site (or layer-window) replacements, scored in few forwards.

Activation patching, ablation and causal tracing are one computation: run a base prompt, replace the activation of
one component at one position (and, for windows, at a range of layers) with a given value, and score the next-token
logits. A sweep describes every such run as one *row* of tensors (`SweepRows`: base row, position, component,
first and last layer) and evaluates the rows in batches, never one forward per site.

Two evaluators give the same numbers:
- `engine`: the base prompts are repeated, one batch row per sweep row, on an `IntervenableModel` with a `replace`
  binding per (component, layer). Each row is routed by per-row index positions: binding `(c, l)` gets the row's
  position where the row restores `c` at `l`, and -1 (nothing) elsewhere. Works on any model the engine resolves.
- `replay` (`replay.py`): for causal decoders, a row restoring position `t` from layer `l` on only differs from the
  base run at layers >= `l` and positions >= `t`, so it runs only those blocks on only those tokens, reusing the
  base run's key/value cache for the earlier positions. It is checked against the model's own forward before use
  and is faster the deeper the model (benchmarks/tracing.py).
`method="auto"` uses the replay where it applies and passes its check, the engine otherwise.

An optional `EmbeddingNoise` adds per-row noise to the embedding output at fixed positions (causal tracing's
corruption) in both evaluators.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..engine import Binding, IntervenableModel
from ..errors import ReftkitError, SiteError
from ..interventions.basic import CollectIntervention, ReplaceIntervention
from ..positions import Positions
from ..sites import Site, model_dims, resolve_site
from .rows import (EmbeddingNoise, SweepRows, forward_kwargs, last_logits, noise_binding,  # noqa: F401 (re-exported)
                   noise_kwargs, with_progress)

log = logging.getLogger(__name__)

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (last-token logits [n, V], base rows [n]) -> [n]
METHODS = ("auto", "replay", "engine")


def check_eval(model) -> None:
    if getattr(model, "training", False):
        raise ReftkitError("the model is in training mode, so dropout would make every patched run random; call "
                           "model.eval() first")


def check_components(model, components) -> list[str]:
    check_eval(model)
    components = [components] if isinstance(components, str) else list(components)
    if not components:
        raise SiteError("no components given; pass e.g. components=('block_output', 'mlp_output')")
    for c in components:
        resolve_site(model, Site(layer=0, component=c))  # raises a SiteError listing the valid components
    return components


@torch.no_grad()
def collect_activations(model, input_ids: torch.Tensor, components, layers=None,
                        noise: EmbeddingNoise | None = None) -> tuple[dict, torch.Tensor]:
    """Activations of every component at every layer and position: `({component: [L, B, T, d]}, last-token
    logits [B, V])`, in one forward (with the embedding noise, if any)."""
    n_layers = model_dims(model).n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bindings = [Binding(Site(layer=l, component=c), CollectIntervention(), name=f"{c}@{l}")
                for c in components for l in layers]
    bindings += noise_binding(noise)
    with IntervenableModel(model, bindings) as im:
        kwargs = noise_kwargs(noise, torch.arange(input_ids.shape[0]))
        result = im.run({"input_ids": input_ids}, **kwargs, **forward_kwargs(model))
    acts = {c: torch.stack([result.collected[f"{c}@{l}"] for l in layers]) for c in components}
    return acts, last_logits(result.output)


def run_sweep(model, input_ids: torch.Tensor, components: list[str], values: dict, rows: SweepRows, score: Score,
              *, noise: EmbeddingNoise | None = None, chunk_size: int = 128, method: str = "auto",
              progress: bool = False) -> torch.Tensor:
    """Scores `[len(rows)]`. `values[c]` is `[L, n_base, T, d]`: the value written for base row `b` at layer `l`
    and position `t` (the source run, zeros, a mean, ...)."""
    if method not in METHODS:
        raise ReftkitError(f"method must be one of {METHODS}, got {method!r}")
    if chunk_size < 1:
        raise ReftkitError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(rows) == 0:
        return torch.zeros(0)
    if method in ("auto", "replay"):
        from .replay import Replay

        replay = Replay.build(model, input_ids, components, noise, required=method == "replay")
        if replay is not None:
            return replay.run(rows, values, score, chunk_size=chunk_size, progress=progress)
    return engine_sweep(model, input_ids, components, values, rows, score, noise=noise, chunk_size=chunk_size,
                        progress=progress)


@torch.no_grad()
def engine_sweep(model, input_ids, components, values, rows: SweepRows, score: Score, *, noise=None,
                 chunk_size: int = 128, progress: bool = False) -> torch.Tensor:
    """The engine evaluator (see the module docstring)."""
    used = {}
    for ci, c in enumerate(components):
        sel = rows.component == ci
        if bool(sel.any()):
            used[ci] = range(int(rows.first_layer[sel].min()), int(rows.last_layer[sel].max()) + 1)
    bindings = [Binding(Site(layer=l, component=components[ci]), ReplaceIntervention(), name=f"{ci}@{l}")
                for ci, layer_range in used.items() for l in layer_range]
    bindings += noise_binding(noise)
    out = torch.empty(len(rows))
    kwargs = forward_kwargs(model)
    chunks = range(0, len(rows), chunk_size)
    with IntervenableModel(model, bindings) as im:
        for start in with_progress(chunks, progress, "sweep"):
            index = torch.arange(start, min(start + chunk_size, len(rows)))
            chunk = rows.take(index)
            positions, reps = {}, {}
            for ci, layer_range in used.items():
                vals = values[components[ci]]
                for l in layer_range:
                    on = (chunk.component == ci) & (chunk.first_layer <= l) & (chunk.last_layer >= l)
                    positions[f"{ci}@{l}"] = Positions.indices(torch.where(on, chunk.position, -1)[:, None])
                    reps[f"{ci}@{l}"] = vals[l, chunk.base, chunk.position].unsqueeze(1)
            extra = noise_kwargs(noise, chunk.base)
            positions.update(extra.get("positions", {}))
            reps.update(extra.get("source_representations", {}))
            result = im.run({"input_ids": input_ids[chunk.base]}, positions=positions, source_representations=reps,
                            **kwargs)
            out[index] = score(last_logits(result.output), chunk.base).float().cpu()
    return out
