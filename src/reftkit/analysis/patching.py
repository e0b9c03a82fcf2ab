"""Activation patching and ablation over every layer x position of chosen components.

`activation_patching(model, clean, corrupted, metric)` replaces one activation at a time and scores the
next-token logits, for every (component, layer, position): `direction="denoise"` (restoration) runs the corrupted
prompt and writes the clean activation, `direction="noise"` runs the clean prompt and writes the corrupted one.
`ablation(model, prompts, metric, kind=...)` writes zeros, the mean over the prompts, or another prompt's
activation (resampling) instead. Results are `[prompt, component, layer, position]` tensors in a
`PatchingResult`, with the unpatched baselines and a heatmap writer.

Decisions:
- Metrics read the last position's logits and return one number per row: `LogitDifference` (correct minus
  incorrect token), `TargetProbability`, `KLToClean` (KL(clean || patched) of the next-token distributions).
  A metric is any callable `(logits [n, V], prompt_index [n]) -> [n]`; `prepare(clean, corrupted)` gives it the
  baselines' logits first.
- All sites are evaluated in batches by `sweep.run_sweep` (per-row routing on the engine, or the replay of the
  changed part of the model), never one forward per site.
- Prompts of one call have one token length: positions are compared one to one.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field

import torch

from ..errors import DataError, ReftkitError
from ..sites import model_dims
from .sweep import SweepRows, check_components, collect_activations, forward_kwargs, last_logits, run_sweep
from .text import as_input_ids, same_shape, single_token, token_labels

DIRECTIONS = ("denoise", "noise")
ABLATIONS = ("zero", "mean", "resample")


# ------------------------------------------------------------------------------------------------- metrics

class PatchingMetric(abc.ABC):
    """Base class: `__call__(logits [n, V], prompt_index [n]) -> [n]`."""

    name = "metric"

    def prepare(self, clean_logits: torch.Tensor, corrupted_logits: torch.Tensor | None) -> None:
        """Receives the last-token logits of the clean and corrupted runs before any patched run."""

    @abc.abstractmethod
    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """The metric per row."""


def _ids(tokens, tokenizer) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.long().reshape(-1)
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    if any(isinstance(t, str) for t in tokens) and tokenizer is None:
        raise DataError("tokens given as strings need tokenizer=...")
    return torch.tensor([single_token(tokenizer, t) for t in tokens], dtype=torch.long)


def _per_prompt(ids: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    if ids.shape[0] == 1:
        return ids.expand(len(prompt_index))
    if len(prompt_index) and int(prompt_index.max()) >= ids.shape[0]:
        raise DataError(f"the metric has tokens for {ids.shape[0]} prompts but prompt {int(prompt_index.max())} was "
                        "scored; give one token for all prompts or one per prompt")
    return ids[prompt_index.to(ids.device)]


class LogitDifference(PatchingMetric):
    """`logit[correct] - logit[incorrect]`; one token for all prompts or one per prompt (ids or one-token
    strings with `tokenizer`)."""

    name = "logit difference"

    def __init__(self, correct, incorrect, tokenizer=None):
        self.correct, self.incorrect = _ids(correct, tokenizer), _ids(incorrect, tokenizer)

    def __call__(self, logits, prompt_index):
        c = _per_prompt(self.correct, prompt_index).to(logits.device)
        i = _per_prompt(self.incorrect, prompt_index).to(logits.device)
        return logits.gather(1, c[:, None])[:, 0] - logits.gather(1, i[:, None])[:, 0]


class TargetProbability(PatchingMetric):
    """Probability of the target token (one for all prompts or one per prompt)."""

    name = "target probability"

    def __init__(self, target, tokenizer=None):
        self.target = _ids(target, tokenizer)

    def __call__(self, logits, prompt_index):
        t = _per_prompt(self.target, prompt_index).to(logits.device)
        return torch.softmax(logits.float(), dim=-1).gather(1, t[:, None])[:, 0]


class KLToClean(PatchingMetric):
    """KL(clean || patched) of the next-token distributions (0 means the clean behaviour is fully restored)."""

    name = "KL to clean"

    def __init__(self):
        self.clean_logprobs: torch.Tensor | None = None

    def prepare(self, clean_logits, corrupted_logits):
        self.clean_logprobs = torch.log_softmax(clean_logits.float(), dim=-1)

    def __call__(self, logits, prompt_index):
        if self.clean_logprobs is None:
            raise ReftkitError("KLToClean needs the clean logits: call prepare(clean_logits, corrupted_logits)")
        ref = self.clean_logprobs[prompt_index.to(self.clean_logprobs.device)]
        lp = torch.log_softmax(logits.float(), dim=-1)
        return (ref.exp() * (ref - lp)).sum(-1)


def as_metric(metric) -> PatchingMetric:
    if metric == "kl":
        return KLToClean()
    if callable(metric):
        return metric
    raise ReftkitError(f"metric must be a PatchingMetric (LogitDifference, TargetProbability, KLToClean), a callable "
                       f"(logits, prompt_index) -> [n], or 'kl'; got {metric!r}")


# ------------------------------------------------------------------------------------------------- results

@dataclass
class PatchingResult:
    """`effects [prompt, component, layer, position]`: the metric with one site patched; `clean` / `corrupted`
    `[prompt]`: the metric of the unpatched runs (`corrupted` is None for ablations)."""

    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor | None
    components: list
    layers: list
    positions: list
    direction: str
    metric: str = "metric"
    tokens: list = field(default_factory=list)

    @property
    def base(self) -> torch.Tensor:
        """The metric of the run that is patched (corrupted for denoising, clean otherwise)."""
        return self.corrupted if self.direction == "denoise" else self.clean

    def delta(self) -> torch.Tensor:
        """Change of the metric caused by each patch, `[prompt, component, layer, position]`."""
        return self.effects - self.base[:, None, None, None]

    def normalized(self) -> torch.Tensor:
        """Fraction of the way from the patched run's metric to the source run's, per prompt."""
        if self.corrupted is None:
            raise ReftkitError("an ablation has no source run to normalise by; use delta()")
        source = self.clean if self.direction == "denoise" else self.corrupted
        span = (source - self.base)[:, None, None, None]
        return self.delta() / torch.where(span.abs() > 1e-12, span, torch.full_like(span, float("nan")))

    def mean(self, normalized: bool = False) -> torch.Tensor:
        """`[component, layer, position]` averaged over prompts."""
        grid = self.normalized() if normalized else self.effects
        return grid.nanmean(0) if normalized else grid.mean(0)

    def to_dict(self) -> dict:
        return {"direction": self.direction, "metric": self.metric, "components": self.components,
                "layers": self.layers, "positions": self.positions, "tokens": self.tokens,
                "clean": self.clean.tolist(), "corrupted": None if self.corrupted is None else self.corrupted.tolist(),
                "effects": self.effects.tolist()}

    def save_plot(self, path, *, normalized: bool | None = None):
        """One PNG with a heatmap per component of the prompt-averaged grid (normalised when a source exists)."""
        from .plots import heatmaps

        normalized = self.corrupted is not None if normalized is None else normalized
        grid = self.mean(normalized) if normalized else self.mean() - self.base.mean()
        label = f"normalised {self.metric}" if normalized else f"change of {self.metric}"
        return heatmaps({c: grid[i] for i, c in enumerate(self.components)}, path, tokens=self.tokens,
                        colorbar=label, layers=self.layers, cmaps={c: "RdBu_r" for c in self.components},
                        center_zero=True, titles={c: f"{self.direction}: {c}" for c in self.components})


# ------------------------------------------------------------------------------------------------ functions

def prepare_pair(model, clean, corrupted, tokenizer, components, layers, positions, metric):
    """Validated inputs of a clean/corrupted comparison: token ids of equal shape, components, the layer and
    position grid, and the metric object."""
    clean_ids = as_input_ids(clean, tokenizer, "clean prompts")
    corrupted_ids = as_input_ids(corrupted, tokenizer, "corrupted prompts")
    same_shape(clean_ids, corrupted_ids)
    components = check_components(model, components)
    layers, positions = _grid_args(model, clean_ids, layers, positions)
    return clean_ids, corrupted_ids, components, layers, positions, as_metric(metric)


def _grid_args(model, ids: torch.Tensor, layers, positions):
    n_layers = model_dims(model).n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    T = ids.shape[1]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    bad = [l for l in layers if not 0 <= l < n_layers] or None
    if bad:
        raise DataError(f"layers {bad} are out of range; the model has layers 0..{n_layers - 1}")
    bad = [p for p in positions if not 0 <= p < T] or None
    if bad:
        raise DataError(f"positions {bad} are out of range for prompts of {T} tokens (0..{T - 1})")
    return layers, positions


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return last_logits(model(input_ids=ids, **forward_kwargs(model)))


def activation_patching(model, clean, corrupted, metric, *, tokenizer=None, components=("block_output",),
                        layers=None, positions=None, direction: str = "denoise", window: int = 1,
                        chunk_size: int = 128, method: str = "auto", progress: bool = False) -> PatchingResult:
    """Patch every (component, layer, position) between clean and corrupted prompts (strings with a tokenizer,
    or `input_ids [P, T]`); see the module docstring."""
    if direction not in DIRECTIONS:
        raise ReftkitError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    clean_ids, corrupted_ids, components, layers, positions, metric = prepare_pair(
        model, clean, corrupted, tokenizer, components, layers, positions, metric)
    base, source = (corrupted_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupted_ids)
    values, source_logits = collect_activations(model, source, components)
    base_logits = _logits(model, base)
    clean_logits, corrupted_logits = ((source_logits, base_logits) if direction == "denoise"
                                      else (base_logits, source_logits))
    return _sweep_result(model, base, components, values, metric, layers, positions, window, chunk_size, method,
                         progress, clean_logits, corrupted_logits, direction, tokenizer, clean_ids)


def ablation(model, prompts, metric, *, kind: str = "zero", tokenizer=None, components=("block_output",),
             layers=None, positions=None, seed: int = 0, chunk_size: int = 128, method: str = "auto",
             progress: bool = False) -> PatchingResult:
    """Ablate every (component, layer, position): `kind="zero"`, `"mean"` (the mean over the prompts at that
    layer and position) or `"resample"` (the activation of another prompt, drawn with `seed`)."""
    if kind not in ABLATIONS:
        raise ReftkitError(f"kind must be one of {ABLATIONS}, got {kind!r}")
    ids = as_input_ids(prompts, tokenizer, "prompts")
    P = ids.shape[0]
    if kind in ("mean", "resample") and P < 2:
        raise DataError(f"{kind} ablation draws on other prompts; pass at least two prompts of the same length")
    components = check_components(model, components)
    layers, positions = _grid_args(model, ids, layers, positions)
    metric = as_metric(metric)
    acts, logits = collect_activations(model, ids, components)
    if kind == "zero":
        values = {c: torch.zeros_like(v) for c, v in acts.items()}
    elif kind == "mean":
        values = {c: v.mean(1, keepdim=True).expand_as(v) for c, v in acts.items()}
    else:
        gen = torch.Generator().manual_seed(seed)
        other = (torch.arange(P) + torch.randint(1, P, (P,), generator=gen)) % P  # never the prompt itself
        values = {c: v[:, other] for c, v in acts.items()}
    return _sweep_result(model, ids, components, values, metric, layers, positions, 1, chunk_size, method, progress,
                         logits, None, f"{kind} ablation", tokenizer, ids)


def _sweep_result(model, base, components, values, metric, layers, positions, window, chunk_size, method, progress,
                  clean_logits, corrupted_logits, direction, tokenizer, label_ids) -> PatchingResult:
    metric.prepare(clean_logits, corrupted_logits)
    P = base.shape[0]
    windows = [1 if c == "block_output" else window for c in components]
    rows = SweepRows.grid(P, len(components), layers, positions, windows, model_dims(model).n_layers)
    scores = run_sweep(model, base, components, values, rows, metric, chunk_size=chunk_size, method=method,
                       progress=progress)
    prompts = torch.arange(P)
    return PatchingResult(
        effects=scores.reshape(P, len(components), len(layers), len(positions)),
        clean=metric(clean_logits, prompts).float().cpu(),
        corrupted=None if corrupted_logits is None else metric(corrupted_logits, prompts).float().cpu(),
        components=list(components), layers=layers, positions=positions, direction=direction,
        metric=getattr(metric, "name", "metric"),
        tokens=[token_labels(tokenizer, label_ids[0])[p] for p in positions])
