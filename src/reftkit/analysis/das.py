"""Distributed alignment search (DAS), Boundless DAS and interchange intervention training (IIT).

Given a causal model's counterfactual dataset (base input, source input(s), the output the causal model predicts
when the variable is interchanged), an `IntervenableModel` whose bindings interchange at the candidate site is
trained so that the network's output after the interchange matches that counterfactual output:
- DAS (Geiger et al. 2023): train the rotation of a `rotated` / `low_rank_rotated` intervention, model frozen;
- Boundless DAS (Wu et al. 2023): a `boundless_rotated` intervention also learns how many rotated dimensions to
  interchange; its sigmoid temperature is annealed from `temperature[0]` to `temperature[1]` (linearly over the
  steps) and `boundary_penalty * boundary` keeps the subspace small;
- IIT (Geiger et al. 2022): train the model itself (`train="model"`, or `"both"`) with the interchange loss plus
  `task_weight` times the ordinary task loss on the base inputs, so that the variable ends up where the bindings
  say.
`interchange_accuracy` (IIA) is the fraction of examples whose intervened prediction equals the counterfactual
label; with balanced data, an intervention that does nothing scores the fraction of unchanged labels.

Decisions: inputs are dicts of tensors with a leading example dimension (token ids, or `inputs_embeds`), so the
loop serves language models and the toy networks of `synthetic.py` alike; `logits_fn(output) -> [batch, classes]`
picks the prediction (default: the last position's logits). Shuffling is seeded; while only the interventions
train, the model's parameters are frozen and restored afterwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..engine import IntervenableModel
from ..errors import DataError, ReftkitError

log = logging.getLogger(__name__)
TRAIN = ("interventions", "model", "both")


def default_logits(output) -> torch.Tensor:
    return output.logits[:, -1]


@dataclass
class InterchangeData:
    """`base` / each of `sources`: model inputs with a leading example dimension; `labels [N]`: counterfactual
    labels (class or token ids); `base_labels [N]`: the task labels of the bases (needed for IIT)."""

    base: dict
    sources: list
    labels: torch.Tensor
    base_labels: torch.Tensor | None = None

    def __post_init__(self):
        n = int(self.labels.shape[0])
        for what, inputs in [("base", self.base)] + [(f"source {i}", s) for i, s in enumerate(self.sources)]:
            for key, value in inputs.items():
                if not isinstance(value, torch.Tensor) or value.shape[0] != n:
                    raise DataError(f"{what} input {key!r} must be a tensor with {n} examples (one per label)")
        if self.base_labels is not None and self.base_labels.shape[0] != n:
            raise DataError(f"base_labels has {self.base_labels.shape[0]} entries for {n} examples")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> "InterchangeData":
        return InterchangeData({k: v[index] for k, v in self.base.items()},
                               [{k: v[index] for k, v in s.items()} for s in self.sources], self.labels[index],
                               None if self.base_labels is None else self.base_labels[index])

    @classmethod
    def from_examples(cls, examples: list[dict], encode: Callable[[list[dict]], dict],
                      label: Callable[[Any], int] = int) -> "InterchangeData":
        """From `CausalModel.counterfactual_dataset` examples; `encode(settings) -> model inputs` turns input
        settings into tensors, `label(output value) -> class id`."""
        if not examples:
            raise DataError("no examples; generate some with CausalModel.counterfactual_dataset")
        n_sources = len(examples[0]["sources"])
        return cls(encode([e["base"] for e in examples]),
                   [encode([e["sources"][i] for e in examples]) for i in range(n_sources)],
                   torch.tensor([label(e["counterfactual_output"]) for e in examples], dtype=torch.long),
                   torch.tensor([label(e["base_output"]) for e in examples], dtype=torch.long))


@dataclass
class TrainLog:
    losses: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    temperature: float | None = None
    boundaries: dict = field(default_factory=dict)


def _temperature_modules(model: IntervenableModel) -> list:
    return [iv for iv in model.interventions if hasattr(iv, "set_temperature")]


def train_interchange(model: IntervenableModel, data: InterchangeData, *, epochs: int = 3, batch_size: int = 64,
                      lr: float = 1e-2, train: str = "interventions", temperature: tuple = (50.0, 0.1),
                      boundary_penalty: float = 0.0, task_weight: float = 1.0,
                      logits_fn: Callable = default_logits, seed: int = 0, progress: bool = False) -> TrainLog:
    """Train for interchange behaviour (see the module docstring); returns the loss per step."""
    if train not in TRAIN:
        raise ReftkitError(f"train must be one of {TRAIN}, got {train!r}")
    if train != "interventions" and data.base_labels is None:
        raise DataError("IIT trains the model with its task loss too; give base_labels in the InterchangeData")
    if len(data) == 0:
        raise DataError("the interchange dataset is empty")
    iv_params = [p for p in model.interventions.parameters() if p.requires_grad]
    net_params = [p for p in model.model.parameters()]
    params = (iv_params if train != "model" else []) + (net_params if train != "interventions" else [])
    if not params:
        raise ReftkitError("nothing to train: the interventions have no trainable parameters; use rotated, "
                           "low_rank_rotated or boundless_rotated, or train='model'")
    saved = [p.requires_grad for p in net_params]
    for p in net_params:
        p.requires_grad_(train != "interventions")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(data) + batch_size - 1) // batch_size
    total = max(epochs * steps_per_epoch, 1)
    annealed = _temperature_modules(model)
    logbook = TrainLog()
    started = time.perf_counter()
    was_training = model.model.training
    model.model.train(train != "interventions")
    try:
        for _ in _progress(range(epochs), progress):
            perm = torch.randperm(len(data), generator=gen)
            for i in range(0, len(data), batch_size):
                if annealed:
                    t = temperature[0] + (temperature[1] - temperature[0]) * logbook.steps / max(total - 1, 1)
                    for iv in annealed:
                        iv.set_temperature(t)
                    logbook.temperature = t
                batch = data.take(perm[i: i + batch_size])
                out = model.run(batch.base, sources=batch.sources)
                loss = nn.functional.cross_entropy(logits_fn(out.output).float(), batch.labels)
                if boundary_penalty:
                    for iv in model.interventions:
                        if hasattr(iv, "intervention_boundaries"):
                            loss = loss + boundary_penalty * iv.intervention_boundaries.sum()
                if train != "interventions" and task_weight:
                    with model.disabled() as plain:
                        task = plain(**batch.base)
                    loss = loss + task_weight * nn.functional.cross_entropy(logits_fn(task).float(),
                                                                            batch.base_labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                logbook.losses.append(float(loss.detach()))
                logbook.steps += 1
    finally:
        for p, flag in zip(net_params, saved):
            p.requires_grad_(flag)
        model.model.train(was_training)
    logbook.seconds = time.perf_counter() - started
    logbook.boundaries = {model.bindings[i].name: float(model.bindings[i].intervention.intervention_boundaries.detach())
                          for i in range(len(model.bindings))
                          if hasattr(model.bindings[i].intervention, "intervention_boundaries")}
    log.info("interchange training: %d steps in %.1f s, final loss %.4f", logbook.steps, logbook.seconds,
             logbook.losses[-1])
    return logbook


@torch.no_grad()
def interchange_accuracy(model: IntervenableModel, data: InterchangeData, *, batch_size: int = 256,
                         logits_fn: Callable = default_logits) -> float:
    """IIA: the fraction of examples whose intervened prediction is the counterfactual label."""
    if len(data) == 0:
        raise DataError("the interchange dataset is empty")
    correct = 0
    for i in range(0, len(data), batch_size):
        batch = data.take(torch.arange(i, min(i + batch_size, len(data))))
        out = model.run(batch.base, sources=batch.sources)
        correct += int((logits_fn(out.output).argmax(-1) == batch.labels).sum())
    return correct / len(data)


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="interchange training", leave=False)
