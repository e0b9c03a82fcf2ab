"""One evaluation protocol for steering vectors, ReFT adapters and prompting baselines.

The protocol lives in these modules, and every public name of the first three is importable from here as well:
- `methods.py`: what is compared (`VectorMethod`, `ConditionalMethod`, `AdapterMethod`, `PromptMethod`,
  `BaseMethod`), each giving a `Runner` for forwards and greedy generation;
- `metrics.py`: the measurements (Δ log-likelihood, steerability, behaviour rate, content retention, side
  effects on neutral text, distinct-n, the AxBench-style score);
- `sweep.py`: coefficient sweeps chosen on a validation half and reported on the test half, layers × strengths
  sweeps under a KL budget, and the sweep plot;
- `compare.py`: several methods on one protocol and one split, as one report with a table.
"""

from __future__ import annotations

from .methods import AdapterMethod, BaseMethod, ConditionalMethod, Method, PromptMethod, Runner, VectorMethod
from .metrics import (behaviour_rate, content_retention, distinct_n, harmonic_mean, likelihood, overall_score, replies,
                      side_effects, steerability)
from .sweep import COLLAPSE_DISTINCT2, FLUENCY, layer_sweep, plot_sweep, split_half, sweep

__all__ = ["AdapterMethod", "BaseMethod", "COLLAPSE_DISTINCT2", "ConditionalMethod", "FLUENCY", "Method",
           "PromptMethod", "Runner", "VectorMethod", "behaviour_rate", "content_retention", "distinct_n", "harmonic_mean", "layer_sweep",
           "likelihood", "overall_score", "plot_sweep", "replies", "side_effects", "split_half", "steerability",
           "sweep"]
