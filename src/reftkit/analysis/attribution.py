"""Attribution patching: a first-order estimate of activation patching from one forward and one backward.

For restoring the clean activation `a_clean` into the corrupted run at a site, the change of the metric is
approximated by `(a_clean - a_corrupted) . d metric / d a` with the gradient taken on the corrupted run (Nanda,
"Attribution Patching", 2023). Every site's gradient comes from the same backward pass: each site gets an `add`
binding whose source is a zero tensor that requires grad, so `d metric / d source` is the gradient with respect
to the activation there, and nothing in the model changes.

`attribution_patching` returns a `PatchingResult` whose `delta()` is the estimate (direction "denoise");
`attribution_vs_patching` also runs exact patching and reports Pearson's r between the two, overall and per
component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import Binding, IntervenableModel
from ..interventions.basic import AddIntervention, CollectIntervention
from ..sites import Site
from .patching import PatchingResult, activation_patching, as_metric, prepare_pair
from .sweep import collect_activations, forward_kwargs, last_logits
from .text import token_labels


def attribution_patching(model, clean, corrupted, metric, *, tokenizer=None, components=("block_output",),
                         layers=None) -> PatchingResult:
    """Estimated denoising effects of every (component, layer, position) site, from one forward + backward on
    the corrupted prompts (and one forward on the clean ones)."""
    clean_ids, corrupted_ids, components, layers, positions, metric = prepare_pair(
        model, clean, corrupted, tokenizer, components, layers, None, metric)
    clean_acts, clean_logits = collect_activations(model, clean_ids, components, layers)

    P, T = corrupted_ids.shape
    bindings, deltas = [], {}
    for c in components:
        for l in layers:
            bindings.append(Binding(Site(layer=l, component=c), AddIntervention(), name=f"grad {c}@{l}"))
            bindings.append(Binding(Site(layer=l, component=c), CollectIntervention(), name=f"{c}@{l}"))
    width = {c: clean_acts[c].shape[-1] for c in components}
    with IntervenableModel(model, bindings) as im, torch.enable_grad():
        for c in components:
            for l in layers:
                deltas[f"grad {c}@{l}"] = torch.zeros(P, T, width[c], requires_grad=True,
                                                      device=clean_acts[c].device)
        result = im.run({"input_ids": corrupted_ids}, source_representations=deltas, **forward_kwargs(model))
        logits = last_logits(result.output)
        metric.prepare(clean_logits, logits.detach())
        values = metric(logits, torch.arange(P))
        grads = torch.autograd.grad(values.sum(), list(deltas.values()))
    grad = dict(zip(deltas, grads))
    estimate = torch.zeros(P, len(components), len(layers), T)
    for ci, c in enumerate(components):
        for li, l in enumerate(layers):
            diff = clean_acts[c][li] - result.collected[f"{c}@{l}"].detach()
            estimate[:, ci, li] = (diff * grad[f"grad {c}@{l}"]).sum(-1).float().cpu()
    corrupted_metric = values.detach().float().cpu()
    return PatchingResult(
        effects=corrupted_metric[:, None, None, None] + estimate,
        clean=metric(clean_logits, torch.arange(P)).float().cpu(), corrupted=corrupted_metric,
        components=list(components), layers=layers, positions=positions, direction="denoise",
        metric=f"{getattr(metric, 'name', 'metric')} (attribution)",
        tokens=token_labels(tokenizer, clean_ids[0]))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation of two tensors' entries (NaN when either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if float(denom) > 0 else float("nan")


@dataclass
class AttributionComparison:
    attribution: PatchingResult
    exact: PatchingResult
    pearson: float
    pearson_per_component: dict

    def to_dict(self) -> dict:
        return {"pearson": self.pearson, "pearson_per_component": self.pearson_per_component,
                "attribution": self.attribution.to_dict(), "exact": self.exact.to_dict()}


def attribution_vs_patching(model, clean, corrupted, metric, *, tokenizer=None, components=("block_output",),
                            layers=None, chunk_size: int = 128, method: str = "auto") -> AttributionComparison:
    """Attribution estimates next to exact denoising patching of the same sites, with Pearson's r of the
    changes of the metric (over every prompt x site, and per component)."""
    metric = as_metric(metric)
    approx = attribution_patching(model, clean, corrupted, metric, tokenizer=tokenizer, components=components,
                                  layers=layers)
    exact = activation_patching(model, clean, corrupted, metric, tokenizer=tokenizer, components=components,
                                layers=approx.layers, direction="denoise", chunk_size=chunk_size, method=method)
    a, e = approx.delta(), exact.delta()
    per = {c: pearson(a[:, i], e[:, i]) for i, c in enumerate(approx.components)}
    return AttributionComparison(approx, exact, pearson(a, e), per)
