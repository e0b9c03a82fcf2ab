"""Interpretability analyses built on the engine.

| module | what it owns |
| --- | --- |
| `patching` | activation patching (denoise / noise) and ablation (zero / mean / resample) over layer x position; metrics |
| `path_patching` | sender -> receiver path patching through the residual stream |
| `tracing` | causal tracing (Meng et al. 2022): noise on the subject, restore one site (or a window) at a time |
| `attribution` | attribution patching (gradient estimate) and its correlation with exact patching |
| `sweep`, `replay` | the batched evaluation shared by patching and tracing (engine routing, or replay of the changed part) |
| `causal_model` | causal models, interchange interventions on them, counterfactual datasets |
| `das` | DAS / Boundless DAS / IIT training loops and interchange intervention accuracy (IIA) |
| `synthetic` | a tiny MLP trained on a causal model's task (ground truth for alignment methods) |
| `probes` | linear probes per layer, control tasks and selectivity |
| `metrics` | matrix entropy and effective rank of representations, per layer |
| `plots` | heatmaps and line plots (matplotlib, imported only when plotting) |

Names are resolved lazily, so `import reftkit.analysis` imports no analysis module until one is used.
"""

from __future__ import annotations

from importlib import import_module as _import_module  # only on the fixed table below

_EXPORTS = {
    "activation_patching": "patching", "ablation": "patching", "PatchingResult": "patching",
    "LogitDifference": "patching", "TargetProbability": "patching", "KLToClean": "patching",
    "PatchingMetric": "patching",
    "path_patching": "path_patching", "PathPatchingResult": "path_patching",
    "causal_trace": "tracing", "TraceResult": "tracing",
    "attribution_patching": "attribution", "attribution_vs_patching": "attribution", "pearson": "attribution",
    "CausalModel": "causal_model", "hierarchical_equality": "causal_model",
    "InterchangeData": "das", "train_interchange": "das", "interchange_accuracy": "das",
    "SymbolMLP": "synthetic", "train_symbol_model": "synthetic",
    "probe_layers": "probes", "fit_probe": "probes", "control_labels": "probes", "collect_vectors": "probes",
    "matrix_entropy": "metrics", "effective_rank": "metrics", "layer_metrics": "metrics",
    "heatmap": "plots",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reftkit.analysis' has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
