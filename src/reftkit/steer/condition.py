"""Conditional steering (CAST): steer a row only when its prompt is "about" a condition direction.

A `Condition` is a direction `c` at one site, an aggregation of the prompt's hidden states there, a threshold and
a side. For each row of a batch, separately:

    h    = mean of the site's hidden states over the row's real prompt tokens (`aggregate="mean"`, template
           tokens included) or the last real prompt token (`aggregate="last"`)
    P    = c cᵀ / (cᵀ c)                           (the projection onto the direction)
    sim  = cos(h, tanh(P h))                       (tanh element-wise)

The row is steered when `sim > threshold` (`fire="above"`, the default) or `sim < threshold` (`fire="below"`).
Because `tanh(P h)` lies along ±c up to the element-wise squashing, `sim` does not depend on the sign of `c·h`:
it measures how much of `h` lies along the direction's axis.

Decisions:
- **Per row, always.** The similarity is computed for every row from its own tokens (positions from the attention
  mask), never from row 0 only; rows that fire get the behaviour vector's coefficient, the others `None`
  (apply.py's per-row coefficients), so a batch gives each row what it would get alone.
- **Once per sequence.** The decision is made on the prompt before generation; generated tokens do not change it.
- **Thresholds** come from `fit_threshold`: a grid (default 0.00, 0.01, ..., 1.00, CAST's) scored by F1 on
  labelled prompts (positives should fire), for both sides unless `fire` is fixed; ties go to the smaller
  threshold on the grid.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .vector import SteeringVector

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "last")
SIDES = ("above", "below")
DEFAULT_GRID = tuple(round(i / 100, 2) for i in range(101))


def cast_similarity(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`cos(h, tanh(P h))` per row of `hidden` `[N, d]`, with `P` the projection onto `direction` `[d]`; `[N]`
    float32 (0 for a zero row)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise DataError(f"hidden states must be a tensor [N, d], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1 or direction.shape[0] != hidden.shape[1]:
        raise ConfigError(f"the condition direction must be a tensor [d={hidden.shape[1]}], got "
                          f"{getattr(direction, 'shape', type(direction))}")
    h = hidden.double()
    c = direction.double().to(h.device)
    cc = float(c @ c)
    if cc == 0:
        raise ConfigError("the condition direction is zero")
    projected = (h @ c)[:, None] / cc * c[None, :]
    return torch.nn.functional.cosine_similarity(h, torch.tanh(projected), dim=1, eps=1e-12).float().cpu()


def _threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"a condition threshold must be a finite number, got {value!r}")
    return float(value)


@dataclass
class Condition:
    """A direction at `site`, compared with each prompt (see the module docstring)."""

    direction: torch.Tensor
    site: str
    threshold: float = 0.5
    aggregate: str = "mean"
    fire: str = "above"

    def __post_init__(self):
        from ..errors import SiteError
        from ..sites import Site

        if not isinstance(self.direction, torch.Tensor) or self.direction.dim() != 1 \
                or not self.direction.is_floating_point() or not self.direction.numel():
            raise ConfigError(f"a condition direction is a float tensor [d], got "
                              f"{getattr(self.direction, 'shape', type(self.direction).__name__)}")
        self.direction = self.direction.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(self.direction).all()) or float(self.direction.norm()) == 0:
            raise ConfigError("a condition direction must be finite and non-zero")
        try:
            self.site = Site.parse(self.site).name
        except (SiteError, TypeError) as e:
            raise ConfigError(f"condition site {self.site!r} is not a site name ('L6.block_output'): {e}") from None
        self.threshold = _threshold(self.threshold)
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"unknown aggregate {self.aggregate!r}; expected one of {', '.join(AGGREGATES)}")
        if self.fire not in SIDES:
            raise ConfigError(f"unknown side {self.fire!r}; expected 'above' or 'below' the threshold")

    @classmethod
    def from_vector(cls, vector: SteeringVector, site: str | None = None, **kwargs) -> "Condition":
        """The direction of `vector` at `site` (required when it has several sites)."""
        if not isinstance(vector, SteeringVector):
            raise ConfigError(f"expected a SteeringVector, got {type(vector).__name__}")
        if site is None:
            if len(vector.sites) != 1:
                raise ConfigError(f"the condition vector has {len(vector.sites)} sites ({', '.join(vector.sites)}); "
                                  "pass site=... to choose one")
            site = vector.sites[0]
        from ..sites import Site

        name = Site.parse(site).name
        if name not in vector.directions:
            raise ConfigError(f"the condition vector has no site {name}; it has {', '.join(vector.sites)}")
        t = vector.directions[name]
        if t.dim() != 1:
            raise ConfigError(f"the condition vector at {name} is positional {tuple(t.shape)}; a condition needs [d]")
        return cls(t, name, **kwargs)

    def with_threshold(self, threshold: float, fire: str | None = None) -> "Condition":
        return Condition(self.direction, self.site, threshold, self.aggregate, self.fire if fire is None else fire)

    # ---- per-row decisions --------------------------------------------------------------------------------
    def similarities_of_ids(self, model, ids: list, *, batch_size: int = 16) -> torch.Tensor:
        """`[N]` similarities for prompts given as token-id lists (each read on its own real tokens)."""
        from ..positions import Positions
        from ..sites import Site
        from .data import Sequence
        from .extract import read_sequences

        ids = [list(map(int, x)) for x in _nonempty_list(ids, "prompts")]
        for i, x in enumerate(ids):
            if not x:
                raise DataError(f"prompt {i} has no tokens; a condition needs at least one")
        seqs = [Sequence(x, len(x), i, "prompt") for i, x in enumerate(ids)]
        read = "last" if self.aggregate == "last" else Positions.parse("all")
        site = Site.parse(self.site)
        vectors, _ = read_sequences(model, _PadTokenizer(model), seqs, [site], read, batch_size=batch_size)
        h = vectors[site.name]
        if h.shape[1] != self.direction.shape[0]:
            raise ConfigError(f"the condition direction has width {self.direction.shape[0]} but {site.name} has "
                              f"width {h.shape[1]}")
        return cast_similarity(h, self.direction)

    def similarities(self, model, tokenizer, prompts: list[str], *, chat: bool = True,
                     batch_size: int = 16) -> torch.Tensor:
        """`[N]` similarities of text prompts, tokenised as generation sees them (chat template when `chat`)."""
        from ..chat import prompt_ids

        prompts = _nonempty_list(prompts, "prompts")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise DataError(f"prompt {i} must be a string, got {type(p).__name__}")
        return self.similarities_of_ids(model, [prompt_ids(tokenizer, p, chat) for p in prompts],
                                        batch_size=batch_size)

    def decide(self, similarities) -> list[bool]:
        """Per row: does the condition fire?"""
        s = torch.as_tensor(similarities, dtype=torch.float64).flatten()
        fired = s > self.threshold if self.fire == "above" else s < self.threshold
        return [bool(x) for x in fired]

    def row_coefficients(self, similarities, coefficient: float) -> list:
        """apply.py's per-row coefficients: `coefficient` where the condition fires, `None` elsewhere."""
        from .vector import check_coefficient

        c = check_coefficient(coefficient)
        return [c if f else None for f in self.decide(similarities)]


class _PadTokenizer:
    """The pad id `read_sequences` needs, when prompts come as ids (right padding with position ids: any id)."""

    def __init__(self, model):
        config = getattr(model, "config", None)
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else 0
        self.eos_token_id = None


def _nonempty_list(value, what: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DataError(f"{what} must be a list, got {type(value).__name__}")
    value = list(value)
    if not value:
        raise DataError(f"no {what} given")
    return value


# ---- steering -------------------------------------------------------------------------------------------------

class ConditionalSteering:
    """The behaviour vector applied to the rows whose prompts fire the condition. `decisions` and `similarities`
    hold the per-row outcome; `generate`/`run` take the same batch (same rows, same order). When no row fires the
    model is left as it is."""

    def __init__(self, model, behaviour: SteeringVector, coefficient, similarities: torch.Tensor,
                 condition: Condition, *, scope=None, unit: str | None = None):
        from .apply import steer

        self.model = model
        self.similarities = similarities
        self.decisions = condition.decide(similarities)
        self.coefficients = condition.row_coefficients(similarities, coefficient)
        self.steered = None
        if any(self.decisions):
            self.steered = steer(model, [(behaviour, self.coefficients)], scope=scope, unit=unit)
        log.info("condition at %s fired for %d of %d row(s)", condition.site, sum(self.decisions),
                 len(self.decisions))

    def _check(self, batch: int) -> None:
        if batch != len(self.decisions):
            raise ConfigError(f"the condition was decided for {len(self.decisions)} rows but got a batch of {batch}")

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self._check(input_ids.shape[0])
        if self.steered is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.steered.generate(input_ids, attention_mask, **kwargs)

    def run(self, inputs: dict):
        self._check(inputs["input_ids"].shape[0])
        if self.steered is None:
            with torch.no_grad():
                return self.model(**inputs)
        return self.steered.run(inputs).output

    def remove(self) -> None:
        if self.steered is not None:
            self.steered.remove()

    def __enter__(self) -> "ConditionalSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def conditional_steer(model, tokenizer, prompts, behaviour: SteeringVector, coefficient, condition: Condition, *,
                      chat: bool = True, scope=None, unit: str | None = None) -> ConditionalSteering:
    """Decide the condition for each prompt (text, or token-id lists when `tokenizer` is None) and steer the rows
    that fire with `behaviour` at `coefficient`."""
    if not isinstance(condition, Condition):
        raise ConfigError(f"expected a Condition, got {type(condition).__name__}")
    if not isinstance(behaviour, SteeringVector):
        raise ConfigError(f"the behaviour must be a SteeringVector, got {type(behaviour).__name__}")
    if tokenizer is None:
        sims = condition.similarities_of_ids(model, prompts)
    else:
        sims = condition.similarities(model, tokenizer, prompts, chat=chat)
    return ConditionalSteering(model, behaviour, coefficient, sims, condition, scope=scope, unit=unit)


# ---- thresholds ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    fire: str
    f1: float
    precision: float
    recall: float


def _f1(fired_pos: int, n_pos: int, fired_neg: int) -> tuple[float, float, float]:
    fired = fired_pos + fired_neg
    precision = fired_pos / fired if fired else 0.0
    recall = fired_pos / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall


def best_threshold(positive, negative, *, grid=DEFAULT_GRID, fire: str | None = None) -> ThresholdFit:
    """The grid threshold (and side, unless `fire` is given) with the highest F1 for "positives fire" on
    precomputed similarities; ties go to the first grid value, "above" before "below"."""
    pos = torch.as_tensor(list(_nonempty_list(positive, "positive similarities")), dtype=torch.float64)
    neg = torch.as_tensor(list(_nonempty_list(negative, "negative similarities")), dtype=torch.float64)
    if not bool(torch.isfinite(pos).all()) or not bool(torch.isfinite(neg).all()):
        raise DataError("similarities must be finite numbers")
    values = [_threshold(t) for t in _nonempty_list(grid, "grid values")]
    sides = SIDES if fire is None else (fire,)
    if any(s not in SIDES for s in sides):
        raise ConfigError(f"unknown side {fire!r}; expected 'above' or 'below'")
    best = None
    for side in sides:
        for t in values:
            if side == "above":
                fp, fn = int((pos > t).sum()), int((neg > t).sum())
            else:
                fp, fn = int((pos < t).sum()), int((neg < t).sum())
            f1, precision, recall = _f1(fp, len(pos), fn)
            if best is None or f1 > best.f1:
                best = ThresholdFit(t, side, f1, precision, recall)
    return best


def fit_threshold(model, tokenizer, condition: Condition, prompts_pos, prompts_neg, *, grid=DEFAULT_GRID,
                  fire: str | None = None, chat: bool = True) -> tuple[Condition, ThresholdFit]:
    """Grid-search the threshold (and side unless `fire`) maximising F1 on labelled prompts: `prompts_pos` should
    fire, `prompts_neg` should not. Returns the condition with that threshold and the fit."""
    if not isinstance(condition, Condition):
        raise ConfigError(f"expected a Condition, got {type(condition).__name__}")
    pos = condition.similarities(model, tokenizer, prompts_pos, chat=chat)
    neg = condition.similarities(model, tokenizer, prompts_neg, chat=chat)
    fit = best_threshold(pos.tolist(), neg.tolist(), grid=grid, fire=fire)
    log.info("condition threshold %s %.2f: F1 %.3f (precision %.3f, recall %.3f) on %d + %d prompts", fit.fire,
             fit.threshold, fit.f1, fit.precision, fit.recall, len(pos), len(neg))
    return condition.with_threshold(fit.threshold, fit.fire), fit


__all__ = ["AGGREGATES", "Condition", "ConditionalSteering", "ThresholdFit", "best_threshold", "cast_similarity",
           "conditional_steer", "fit_threshold"]
