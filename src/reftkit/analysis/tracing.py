"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

The subject's token embeddings are corrupted with Gaussian noise; then, one site at a time, a hidden state of the
clean run is restored, and the probability of the target token is measured. Restoring a site that carries the
fact brings the probability back. Three grids `[layer, position]` result: restoring the block output (the
residual stream), the MLP output and the attention output; MLP and attention are restored over a window of
layers around each layer (10 in the paper), the block output at one layer.

Decisions:
- Noise: standard deviation `noise * std(embedding matrix)` (3x by default, as in the paper, which measures the
  spread of subject-token embeddings; the whole embedding matrix is a fixed, model-level reference). It is drawn
  once per call from a generator seeded with `seed`, `samples` draws, and the same draws corrupt every restored
  run, so the grids differ only by what is restored. Probabilities are averaged over the draws.
- Positions before the subject see no corruption in a causal model, so restoring them changes nothing: their
  cells are the corrupted probability, filled in without running them.
- Every restoration is batched (`sweep.run_sweep`): rows are (draw, component, layer, position), evaluated in
  chunks; on causal decoders the replay evaluator runs only the layers and tokens each row can change. The
  default `chunk_size` (512) holds all rows of one position for 5 draws x 3 components x 30 layers: fewer, larger
  operations, which matters most on a busy CPU.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError, ReftkitError
from ..sites import model_dims
from .sweep import EmbeddingNoise, SweepRows, check_components, collect_activations, run_sweep
from .text import find_subject, single_token, token_labels

log = logging.getLogger(__name__)

COMPONENTS = ("block_output", "mlp_output", "attention_output")
TITLES = {"block_output": "restoring the hidden state", "mlp_output": "restoring MLP outputs",
          "attention_output": "restoring attention outputs"}
CMAPS = {"block_output": "Purples", "mlp_output": "Greens", "attention_output": "Reds"}


@dataclass
class TraceResult:
    """Target probabilities after restoring each site: `grids[component] [layer, position]`."""

    prompt: str
    subject: str
    target: str
    target_id: int
    tokens: list
    subject_range: tuple
    clean_prob: float
    corrupted_prob: float
    grids: dict
    window: int
    samples: int
    noise_std: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def indirect_effects(self) -> dict:
        """Probability recovered by each restoration: `grid - corrupted_prob`."""
        return {c: g - self.corrupted_prob for c, g in self.grids.items()}

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "subject": self.subject, "target": self.target, "target_id": self.target_id,
                "tokens": self.tokens, "subject_range": list(self.subject_range), "clean_prob": self.clean_prob,
                "corrupted_prob": self.corrupted_prob, "window": self.window, "samples": self.samples,
                "noise_std": self.noise_std, "seconds": self.seconds,
                "grids": {c: g.tolist() for c, g in self.grids.items()}}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def save_plots(self, directory, prefix: str = "trace") -> list[Path]:
        """One heatmap PNG per component (`<prefix>_<component>.png`); returns the paths written."""
        from .plots import heatmap

        directory = Path(directory)
        paths = []
        for c, grid in self.grids.items():
            window = "" if c == "block_output" or self.window == 1 else f", window {self.window}"
            title = (f"{TITLES.get(c, c)}{window}\np({self.target!r}): clean {self.clean_prob:.3f}, "
                     f"corrupted {self.corrupted_prob:.3f}")
            paths.append(heatmap(grid, directory / f"{prefix}_{c}.png", tokens=self.tokens, title=title,
                                 colorbar=f"p({self.target.strip() or self.target!r})", cmap=CMAPS.get(c, "Purples"),
                                 marked=self.subject_range))
        return paths


def embedding_std(model) -> float:
    """Standard deviation of the input embedding matrix (all tokens, all dimensions)."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach().float().std())


def causal_trace(model, tokenizer, prompt: str, subject: str, target: "str | int | None" = None, *,
                 samples: int = 5, noise: float = 3.0, noise_std: float | None = None, seed: int = 0,
                 window: int = 10, components=COMPONENTS, chunk_size: int = 512, method: str = "auto",
                 progress: bool = False) -> TraceResult:
    """Trace where `prompt` stores the fact that makes the model predict `target` (a one-token string or id;
    default: the model's own greedy prediction). See the module docstring."""
    if samples < 1:
        raise ReftkitError(f"samples must be >= 1, got {samples}")
    if window < 1:
        raise ReftkitError(f"window must be >= 1, got {window}")
    started = time.perf_counter()
    ids, start, end = find_subject(tokenizer, prompt, subject)
    ids = ids[None]
    T = ids.shape[1]
    components = check_components(model, components)
    n_layers = model_dims(model).n_layers

    acts, clean_logits = collect_activations(model, ids, components)
    if target is None:
        target_id = int(clean_logits[0].argmax())
        target = tokenizer.decode([target_id])
    else:
        target_id = single_token(tokenizer, target)
        target = target if isinstance(target, str) else tokenizer.decode([target_id])
    vocab = clean_logits.shape[-1]
    if not 0 <= target_id < vocab:
        raise DataError(f"target id {target_id} is outside the vocabulary (0..{vocab - 1})")
    clean_prob = float(torch.softmax(clean_logits[0], -1)[target_id])

    std = noise * embedding_std(model) if noise_std is None else float(noise_std)
    gen = torch.Generator().manual_seed(seed)
    d = acts[components[0]].shape[-1]
    draws = torch.randn(samples, end - start, d, generator=gen) * std
    dtype = model.get_input_embeddings().weight.dtype
    corruption = EmbeddingNoise(torch.arange(start, end), draws.to(dtype))
    base = ids.expand(samples, -1)

    def score(logits, rows):
        return torch.softmax(logits.float(), -1)[:, target_id]

    _, corrupted_logits = collect_activations(model, base, [], noise=corruption)
    corrupted_prob = float(score(corrupted_logits, None).mean())

    values = {c: v.expand(-1, samples, -1, -1) for c, v in acts.items()}  # the clean run, for every draw
    windows = [1 if c == "block_output" else window for c in components]
    rows = SweepRows.grid(samples, len(components), range(n_layers), range(start, T), windows, n_layers)
    probs = run_sweep(model, base, components, values, rows, score, noise=corruption, chunk_size=chunk_size,
                      method=method, progress=progress)
    probs = probs.reshape(samples, len(components), n_layers, T - start).mean(0)
    grids = {}
    for ci, c in enumerate(components):
        grid = torch.full((n_layers, T), corrupted_prob)
        grid[:, start:] = probs[ci]
        grids[c] = grid
    seconds = time.perf_counter() - started
    log.info("traced %d restorations in %.1f s", len(rows), seconds)
    return TraceResult(prompt, subject, target, target_id, token_labels(tokenizer, ids[0]), (start, end), clean_prob,
                       corrupted_prob, grids, window, samples, std, seconds, {"restorations": len(rows)})
