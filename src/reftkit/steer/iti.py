"""Inference-time intervention (ITI; Li et al., arXiv 2306.03341): probe-ranked attention heads, a mass-mean
shift per head, scaled by the spread of the activations along it.

`iti(model, tokenizer, pairs)` reads each head's output before the attention output projection
(`L{l}.attention_value_output`, split into heads: the `L{l}.H{h}.head_attention_value_output` slices that a
write edits) at the read position (the last token by default) of both sides of every contrast pair — the
positive side is the behaviour to move towards (ITI's true answers) — and fits `from_head_activations`:

- **Split.** A seeded permutation puts `val_ratio` of the pairs (at least one) in a validation set; both sides
  of a pair stay together, as ITI splits by question.
- **Probe per head.** An L2-regularised logistic regression per head on the training pairs (positive = 1),
  fitted for all heads at once in float64 by damped Newton steps from zero (`fit_probes`: each head's own
  minimum, to rounding); inputs are centred on the training mean and divided by their RMS norm.
- **Ranking.** Heads are ranked by validation accuracy, ties broken by the validation log-likelihood, then by
  (layer, head); the top `heads` (K, ITI's default 48, at most the number of heads read) are kept.
- **Direction.** Per kept head the mass-mean shift θ = mean(positive) − mean(negative) over all pairs,
  θ̂ = θ/‖θ‖, and σ = the standard deviation (population, as numpy's) of the projections x·θ̂ of all
  activations, both sides.
  The stored direction is σ·θ̂, so a raw coefficient α adds α·σ·θ̂ (ITI's edit; the paper uses α = 15).

The result is a `SteeringVector` (method `iti`, operator `add`, unit `raw`) with one `[d_head]` direction per
kept head and scope `l1@all`, the last prompt token and then every generated token (`last_prompt_token_then_
generated`). Its report holds every head's validation accuracy, the kept heads with their σ and ‖θ‖, and the
scales `<site>/mean_diff_norm` (‖θ‖) and `<site>/hidden_norm` (the heads' mean activation norm).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..adapters import base_model_record
from ..errors import ConfigError, DataError
from ..sites import Site, model_dims
from .data import make_pairs
from .reading import read_pairs, read_sites
from .vector import SteeringVector

log = logging.getLogger(__name__)

DEFAULT_HEADS = 48
SCOPE = "l1@all"
_EPS = 1e-12


def split_pairs(n: int, val_ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (training, validation) pair indices of a seeded permutation; at least one of each."""
    if isinstance(val_ratio, bool) or not isinstance(val_ratio, (int, float)) or not 0 < val_ratio < 1:
        raise ConfigError(f"val_ratio must be a number in (0, 1), got {val_ratio!r}")
    n_val = max(1, round(n * val_ratio))
    if n - n_val < 1:
        raise DataError(f"ITI needs at least 2 pairs (one to fit the probes, one to rank them), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def fit_probes(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression per head, all heads at once: minimises, for each h,
    mean_i BCE(x[h, i]·w_h + b_h, y_i) + l2·‖w_h‖² (the bias is not penalised) by damped Newton steps in float64
    from zero (a step that raises a head's loss is halved, up to 30 times), until every step is below 1e-10 or
    after `steps` steps. `x [H, n, d]`, `y [n]` -> (w `[H, d]`, b `[H]`)."""
    H, n, d = x.shape
    z = torch.cat([x.double(), torch.ones(H, n, 1, dtype=torch.float64)], -1)
    y = y.double()
    reg = torch.full((d + 1,), 2.0 * l2, dtype=torch.float64)
    reg[-1] = 0.0
    theta = torch.zeros(H, d + 1, dtype=torch.float64)

    def loss(t):
        logits = torch.einsum("hnd,hd->hn", z, t)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y.expand(H, -1), reduction="none").mean(1)
        return bce + 0.5 * (reg * t * t).sum(-1)

    current = loss(theta)
    for _ in range(steps):
        p = torch.sigmoid(torch.einsum("hnd,hd->hn", z, theta))
        grad = torch.einsum("hnd,hn->hd", z, p - y) / n + reg * theta
        hess = torch.einsum("hnd,hn,hne->hde", z, p * (1 - p), z) / n + torch.diag(reg)
        hess = hess + 1e-12 * torch.eye(d + 1, dtype=torch.float64)  # the bias row of a head with no spread
        step = torch.linalg.solve(hess, grad)
        scale = torch.ones(H, 1, dtype=torch.float64)
        for _ in range(30):
            new = loss(theta - scale * step)
            worse = new > current
            if not bool(worse.any()):
                break
            scale = torch.where(worse[:, None], scale / 2, scale)
        theta = theta - scale * step
        current = loss(theta)
        if float((scale * step).abs().max()) < 1e-10:
            break
    return theta[:, :-1], theta[:, -1]


def probe_heads(pos_train: torch.Tensor, neg_train: torch.Tensor, pos_val: torch.Tensor, neg_val: torch.Tensor, *,
                l2: float = 1e-3, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head of `[N, H, d]` activations: a logistic probe on the training rows (`fit_probes` on the inputs
    centred on the training mean and divided by their RMS norm), scored on the validation rows.
    -> (validation accuracy `[H]`, mean validation log-likelihood `[H]`), float64."""
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0 or not math.isfinite(l2):
        raise ConfigError(f"l2 must be a finite number > 0 (it keeps separable heads' probes finite), got {l2!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    x = torch.cat([pos_train, neg_train]).double().transpose(0, 1)  # [H, n, d]
    y = torch.cat([torch.ones(len(pos_train)), torch.zeros(len(neg_train))]).double()
    mean = x.mean(1, keepdim=True)
    rms = (x - mean).pow(2).sum(-1).mean(1).sqrt().clamp(min=_EPS)[:, None, None]
    w, b = fit_probes((x - mean) / rms, y, l2, steps)
    H = x.shape[0]
    xv = torch.cat([pos_val, neg_val]).double().transpose(0, 1)
    yv = torch.cat([torch.ones(len(pos_val)), torch.zeros(len(neg_val))]).double()
    logits = torch.einsum("hnd,hd->hn", (xv - mean) / rms, w) + b[:, None]
    accuracy = ((logits > 0).double() == yv).double().mean(1)
    loglik = -nn.functional.binary_cross_entropy_with_logits(logits, yv.expand(H, -1), reduction="none").mean(1)
    return accuracy, loglik


def rank_heads(accuracy: torch.Tensor, loglik: torch.Tensor, k: int) -> list[int]:
    """Indices of the top `k` heads: highest accuracy, then highest log-likelihood, then the lowest index."""
    order = sorted(range(len(accuracy)), key=lambda i: (-float(accuracy[i]), -float(loglik[i]), i))
    return order[:k]


def mass_mean_shift(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """-> (θ̂ `[d]` float64, σ, ‖θ‖) for one head's `[N, d]` activations (module docstring)."""
    p, n = pos.double(), neg.double()
    theta = p.mean(0) - n.mean(0)
    norm = float(theta.norm())
    if norm <= _EPS:
        raise DataError("a selected head's positive and negative activations have the same mean; it has no "
                        "mass-mean direction")
    unit = theta / norm
    sigma = float((torch.cat([p, n]) @ unit).std(unbiased=False))
    return unit, sigma, norm


def from_head_activations(positive: dict, negative: dict, *, heads: int = DEFAULT_HEADS, val_ratio: float = 0.2,
                          seed: int = 0, l2: float = 1e-3, steps: int = 100, read: str | None = None,
                          model_hint: dict | None = None, warnings: list | None = None,
                          read_seconds: float | None = None) -> SteeringVector:
    """ITI from per-layer head activations `{layer: [N, H, d_head]}` for each side (row i = pair i)."""
    start = time.perf_counter()
    if not isinstance(positive, dict) or not positive or set(positive) != set(negative):
        raise DataError("head activations must be dicts {layer: [N, H, d_head]} with the same layers on both sides")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ConfigError(f"heads must be a positive integer (how many heads to steer), got {heads!r}")
    warnings = list(warnings or [])
    layers = sorted(positive)
    shapes = {tuple(positive[l].shape) for l in layers} | {tuple(negative[l].shape) for l in layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise DataError(f"head activations must all be [N, H, d_head] of one shape, got {sorted(shapes)}")
    N, H, dh = next(iter(shapes))
    if not all(bool(torch.isfinite(t).all()) for t in (*positive.values(), *negative.values())):
        raise DataError("head activations hold non-finite values")
    pos = torch.cat([positive[l] for l in layers], 1)  # [N, L*H, d]
    neg = torch.cat([negative[l] for l in layers], 1)
    train, val = split_pairs(N, val_ratio, seed)
    accuracy, loglik = probe_heads(pos[train], neg[train], pos[val], neg[val], l2=l2, steps=steps)
    total = pos.shape[1]
    if heads > total:
        warnings.append(f"heads={heads} but only {total} heads were read; steering all of them")
    chosen = rank_heads(accuracy, loglik, min(heads, total))
    directions, scales, kept = {}, {}, []
    for j in chosen:
        layer, head = layers[j // H], j % H
        site = Site(layer=layer, component="head_attention_value_output", head=head).name
        unit, sigma, norm = mass_mean_shift(pos[:, j], neg[:, j])
        directions[site] = (sigma * unit).float()
        hidden = float(torch.cat([pos[:, j], neg[:, j]]).double().norm(dim=-1).mean())
        scales[f"{site}/mean_diff_norm"] = norm
        scales[f"{site}/hidden_norm"] = hidden
        kept.append({"site": site, "layer": layer, "head": head, "val_accuracy": float(accuracy[j]),
                     "val_loglik": float(loglik[j]), "sigma": sigma, "mean_diff_norm": norm, "hidden_norm": hidden})
    if kept and kept[0]["val_accuracy"] <= 0.5:
        warnings.append(f"the best head's validation accuracy is {kept[0]['val_accuracy']:.2f}: no head separates "
                        "the two sides better than chance")
    for w in warnings:
        log.warning("%s", w)
    table = accuracy.reshape(len(layers), H)
    report = {"method": "iti", "options": {"heads": heads, "val_ratio": val_ratio, "seed": seed, "l2": l2,
                                           "steps": steps},
              "read": read, "layers": layers, "counts": {"positive": N, "negative": N, "train": len(train),
                                                        "val": len(val)},
              "sites": {h["site"]: {"norm": h["sigma"], "hidden_norm": h["hidden_norm"],
                                    "relative_norm": h["sigma"] / max(h["hidden_norm"], _EPS),
                                    "mean_diff_norm": h["mean_diff_norm"], "val_accuracy": h["val_accuracy"]}
                        for h in kept},
              "heads": kept, "val_accuracy": {str(l): [float(a) for a in table[i]] for i, l in enumerate(layers)},
              "suggested_coefficient": 15.0, "direction_kind": "sigma_scaled_unit", "warnings": warnings,
              "timing": {"read_s": read_seconds, "fit_s": time.perf_counter() - start}}
    log.info("ITI: %d heads, best validation accuracy %.2f", len(kept), kept[0]["val_accuracy"])
    return SteeringVector(directions=directions, method="iti", operator="add", scope=SCOPE, unit="raw",
                          scales=scales, counts={"positive": N, "negative": N}, model_hint=dict(model_hint or {}),
                          report=report)


def iti(model, tokenizer, pairs, *, heads: int = DEFAULT_HEADS, layers=None, read="last", chat: bool = False,
        val_ratio: float = 0.2, seed: int = 0, l2: float = 1e-3, steps: int = 100, batch_size: int = 16,
        padding_side: str = "right", progress: bool = False) -> SteeringVector:
    """Read every head at `read` for both sides of `pairs` and fit ITI (see the module docstring)."""
    pairs = make_pairs(pairs=pairs)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ConfigError(f"heads must be a positive integer (how many heads to steer), got {heads!r}")
    split_pairs(len(pairs), val_ratio, seed)  # too few pairs fail before the forwards
    dims = model_dims(model)
    layer_list = [s.layer for s in read_sites(model, layers=layers)]
    sites = [Site(layer=l, component="attention_value_output") for l in layer_list]
    acts = read_pairs(model, tokenizer, pairs, sites=sites, read=read, chat=chat, batch_size=batch_size,
                      padding_side=padding_side, progress=progress)
    positive, negative = {}, {}
    for l, s in zip(layer_list, sites):
        p, n = acts.positive[s.name], acts.negative[s.name]
        if p.shape[-1] % dims.n_heads:
            raise DataError(f"{s.name} has width {p.shape[-1]}, not a multiple of the {dims.n_heads} heads")
        positive[l] = p.reshape(len(p), dims.n_heads, -1)
        negative[l] = n.reshape(len(n), dims.n_heads, -1)
    return from_head_activations(positive, negative, heads=heads, val_ratio=val_ratio, seed=seed, l2=l2, steps=steps,
                                 read=acts.read, model_hint=base_model_record(model), warnings=acts.warnings,
                                 read_seconds=acts.seconds)


__all__ = ["DEFAULT_HEADS", "fit_probes", "from_head_activations", "iti", "mass_mean_shift", "probe_heads",
           "rank_heads",
           "split_pairs"]
