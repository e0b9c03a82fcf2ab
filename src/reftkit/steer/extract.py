"""Steering-vector extractors: contrastive activations in, a `SteeringVector` with per-site directions out.

`extract(model, tokenizer, pairs, method=...)` reads every requested site for every pair (`read_pairs`) and
fits a direction per site (`from_activations`); `from_activations` takes precomputed `[N, d]` activations, so the
arithmetic can be used (and tested) without a model. `actadd` builds ActAdd's positional `[T, d]` vector from one
prompt pair. `method="refusal" | "iti" | "lape"` goes to `refusal.py`, `iti.py` and `lape.py` (`extract_family`),
which read through the same machinery but select positions, heads or neurons of their own.

Reading (`reading.py`): one forward per batch for all sites, positions from the attention mask; see there.

Methods (all directions float32 CPU tensors; p_i, n_i the two sides of pair i, d_i = p_i - n_i):
- `mean_diff` (CAA, the default): v = mean(p) - mean(n), raw (not normalised). `normalize="cross_behaviour"` is
  CAA's rule: at each site the vector is rescaled to the mean norm over behaviours, v_b <- v_b * mean_b'
  ||v_b'|| / ||v_b||, so one multiplier means the same across behaviours. The mean is over `norm_reference` (the
  other behaviours' SteeringVectors, plus this one), or `norm_reference` gives the target norm itself (a float,
  or a dict per site). `normalize_across_behaviours(vectors)` does it for a set of finished vectors.
- `pca`, unit norm, variants (all a top right-singular vector of a matrix X):
  `diff_centered`: X = d - mean(d) (repeng's `pca_diff`: its PCA centres its input, so the mean difference is
  removed and the direction can be far from it); `diff_uncentered`: X = d (the top principal direction of the
  un-centred differences, i.e. of [d; -d]); `pair_centered`: X = [p - c; n - c] with c = (p + n) / 2, then
  centred (repeng's `pca_center`, IBM's `pca_pairwise`). Since p - c = d / 2 = -(n - c), this stack is already
  centred and spans the same direction as `diff_uncentered`; both are offered so the names of the references
  map one to one.
  Sign rules (`sign=`): `"majority"` (repeng, IBM; default for `diff_centered` and `pair_centered`) projects the
  un-centred p and n on v and flips v when p < n for more pairs than p > n (a vote, not a mean); ties are broken by
  the mean projection. `"mean"` (steering-vectors; default for `diff_uncentered`) flips v when mean(d . v) < 0.
  Before either rule v is made reproducible: its largest-magnitude component is positive.
- `logistic`: an L2-regularised logistic-regression probe per site (positive = 1), fitted in float64 with
  full-batch L-BFGS from zero (deterministic) on the inputs centred on their mean and divided by their RMS norm
  (one scalar, so the direction is unchanged); direction = w / ||w||, oriented so positives project higher.
- `actadd`: one prompt pair; h_A[t] = h(p+)[t] - h(p-)[t] for t < T at each site, `[T, d]`, for injection at the
  front of a prompt (scope `f{T}@prompt`). The shorter prompt is right-padded with real tokens (the space token
  by default, as ActAdd does, or `pad_token_id`) that the model attends to, or both are cut to the shorter
  (`pad="truncate"`). Under a shared BOS, h_A[0] = 0.

Report (JSON-able, `SteeringVector.report`): method and options, counts, sites, layers, read position, timing,
`warnings`, and per site: `norm` (||v|| of each direction; per-position norms for ActAdd), `hidden_norm` (the
mean token norm ||h|| at the read tokens, both sides), `relative_norm` (||v|| / ||h||), `mean_diff_norm` and
`mean_diff_relative`, `consistency` (mean cosine of each d_i to mean(d)), and for PCA `explained_variance`
(sigma_1^2 / sum sigma^2 of X) and `cosine_to_mean_diff` (a warning below 0.8), for logistic `accuracy` and
`cosine_to_mean_diff`.

Scales (`SteeringVector.scales`, keys `"<site>/<kind>"`): `<site>/mean_diff_norm` is ||mean(p) - mean(n)|| as read
(before any cross-behaviour rescaling) and `<site>/hidden_norm` the mean token norm ||h|| at the read tokens, so a
coefficient in either unit means "that many mean differences" or "that fraction of a typical hidden state" along
the direction; `<site>/direction_norm` is recorded by `SteeringVector` itself. ActAdd vectors are positional and
take raw coefficients; they record `hidden_norm` only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch import nn

from ..adapters import base_model_record
from ..engine import Binding, IntervenableModel
from ..errors import ConfigError, DataError, SiteError
from ..interventions.basic import CollectIntervention
from ..positions import Positions
from ..sites import Site
from .data import make_pairs, tokenise_pairs
from .reading import (ContrastActivations, _model_device, after_final_norm, iter_batches, read_pairs,
                      read_sequences, read_sites)
from .vector import SteeringVector

log = logging.getLogger(__name__)

METHODS = ("mean_diff", "pca", "logistic", "actadd")
FAMILY_METHODS = ("refusal", "iti", "lape")  # their own modules: refusal.py, iti.py, lape.py
PCA_VARIANTS = ("diff_centered", "diff_uncentered", "pair_centered")
UNITS = ("raw", "mean_diff_norm", "hidden_norm")
LOW_PCA_COSINE = 0.8
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ the math

def _check_pair_tensors(pos: torch.Tensor, neg: torch.Tensor, site: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    where = f"site {site}: " if site else ""
    if not isinstance(pos, torch.Tensor) or not isinstance(neg, torch.Tensor):
        raise DataError(f"{where}activations must be tensors [N, d]")
    if pos.dim() != 2 or pos.shape != neg.shape:
        raise DataError(f"{where}positive {tuple(pos.shape)} and negative {tuple(neg.shape)} activations must both "
                        "be [N, d] with one row per pair")
    if pos.shape[0] == 0:
        raise DataError(f"{where}no pairs (0 rows of activations)")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise DataError(f"{where}activations hold non-finite values")
    return pos.double(), neg.double()


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(p) - mean(n), `[d]` float32."""
    p, n = _check_pair_tensors(pos, neg)
    return (p.mean(0) - n.mean(0)).float()


def difference_consistency(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Mean cosine of each pair difference to their mean (1: every pair moves the same way)."""
    p, n = _check_pair_tensors(pos, neg)
    d = p - n
    m = d.mean(0)
    cos = (d @ m) / (d.norm(dim=1) * m.norm()).clamp(min=_EPS)
    return float(cos.mean())


def _unit_and_reproducible(v: torch.Tensor) -> torch.Tensor:
    v = v / v.norm().clamp(min=_EPS)
    return -v if v[v.abs().argmax()] < 0 else v


def pca_direction(pos: torch.Tensor, neg: torch.Tensor, variant: str = "diff_centered",
                  sign: str | None = None) -> tuple[torch.Tensor, float]:
    """-> (unit direction `[d]` float32, explained variance of the first component); see the module docstring."""
    if variant not in PCA_VARIANTS:
        raise ConfigError(f"unknown PCA variant {variant!r}; expected one of {PCA_VARIANTS}")
    sign = sign or ("mean" if variant == "diff_uncentered" else "majority")
    if sign not in ("majority", "mean"):
        raise ConfigError(f"unknown sign rule {sign!r}; expected 'majority' or 'mean'")
    p, n = _check_pair_tensors(pos, neg)
    d = p - n
    if variant == "diff_centered":
        x = d - d.mean(0)
    elif variant == "diff_uncentered":
        x = d
    else:
        c = (p + n) / 2
        x = torch.cat([p - c, n - c])
        x = x - x.mean(0)
    s = torch.linalg.svdvals(x)
    total = float(s.pow(2).sum())
    if total <= _EPS * max(float(d.abs().max()), 1.0) ** 2:
        need = " (it removes the mean difference, so it needs at least 2 pairs that differ)" \
            if variant == "diff_centered" else ""
        raise DataError(f"PCA variant {variant!r} has nothing to fit: the pair differences have no variance{need}")
    v = _unit_and_reproducible(torch.linalg.svd(x, full_matrices=False).Vh[0])
    proj = d @ v  # = p.v - n.v, the un-centred projections' difference per pair
    if sign == "majority":
        below, above = float((proj < 0).double().mean()), float((proj > 0).double().mean())
        flip = below > above or (below == above and float(proj.mean()) < 0)
    else:
        flip = float(proj.mean()) < 0
    v = -v if flip else v
    return v.float(), float(s[0] ** 2) / total


def logistic_direction(pos: torch.Tensor, neg: torch.Tensor, *, l2: float = 1e-3,
                       steps: int = 100) -> tuple[torch.Tensor, float]:
    """-> (unit direction `[d]` float32 oriented towards the positives, training accuracy)."""
    if not l2 >= 0 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"logistic needs l2 >= 0 and steps >= 1, got l2={l2!r}, steps={steps!r}")
    p, n = _check_pair_tensors(pos, neg)
    x = torch.cat([p, n])
    y = torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).double()
    z = x - x.mean(0)
    z = z / z.pow(2).sum(1).mean().sqrt().clamp(min=_EPS)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    if float(w.norm()) <= _EPS:
        raise DataError("the logistic probe found no direction: positive and negative activations do not differ")
    accuracy = float(((z @ w + b > 0).double() == y).double().mean())
    v = w / w.norm()
    if float((p @ v).mean()) < float((n @ v).mean()):
        v = -v
    return v.float(), accuracy


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=_EPS))


def normalize_across_behaviours(vectors: list) -> list:
    """CAA's cross-behaviour normalisation: at each site every vector is rescaled to the mean norm of that site's
    vectors over all behaviours, v_b <- v_b * mean_b' ||v_b'|| / ||v_b||. Every vector must have the same sites."""
    vectors = list(vectors)
    if not vectors:
        raise ConfigError("no steering vectors to normalise")
    sites = list(vectors[0].directions)
    for i, sv in enumerate(vectors):
        if set(sv.directions) != set(sites):
            raise ConfigError(f"vector {i} has sites {sorted(sv.directions)} but vector 0 has {sorted(sites)}; "
                              "cross-behaviour normalisation compares the same sites")
        if any(v.dim() != 1 for v in sv.directions.values()):
            raise ConfigError(f"vector {i} is positional ([T, d]); cross-behaviour normalisation takes [d] vectors")
    target = {s: sum(float(sv.directions[s].double().norm()) for sv in vectors) / len(vectors) for s in sites}
    return [_rescaled(sv, target) for sv in vectors]


def _rescaled(sv, target: dict):
    directions, norms = {}, {}
    for s, v in sv.directions.items():
        norm = float(v.double().norm())
        if norm <= _EPS:
            raise DataError(f"site {s}: the vector is zero and cannot be rescaled to norm {target[s]:.4g}")
        directions[s] = (v.double() * (target[s] / norm)).float()
        norms[s] = float(directions[s].norm())
    report = {**sv.report, "normalized": {"rule": "cross_behaviour", "target_norm": dict(target)}}
    sites = {s: {**r, "norm": norms.get(s, r.get("norm"))} for s, r in report.get("sites", {}).items()}
    if sites:
        report["sites"] = sites
    scales = {k: v for k, v in sv.scales.items() if not k.endswith("/direction_norm")}  # recomputed on construction
    return replace(sv, directions=directions, scales=scales, report=report)


# ------------------------------------------------------------------------------------------ the extractors

def _options(method: str, options: dict) -> dict:
    allowed = {"mean_diff": {"normalize": None, "norm_reference": None},
               "pca": {"variant": "diff_centered", "sign": None},
               "logistic": {"l2": 1e-3, "steps": 100}}[method]
    unknown = set(options) - set(allowed)
    if unknown:
        raise ConfigError(f"method {method!r} takes options {sorted(allowed)}; got unknown {sorted(unknown)}")
    return {**allowed, **options}


def from_activations(positive: dict, negative: dict, method: str = "mean_diff", *, hidden_norm: dict | None = None,
                     unit: str = "raw", read: str | None = None, model_hint: dict | None = None,
                     warnings: list | None = None, read_seconds: float | None = None, **options):
    """A `SteeringVector` from precomputed activations `{site: [N, d]}` per side (row i of each = pair i).
    `hidden_norm` (per site) defaults to the mean norm of the given rows. Options per method: mean_diff
    `normalize` / `norm_reference`, pca `variant` / `sign`, logistic `l2` / `steps` (module docstring)."""
    start = time.perf_counter()
    if method == "actadd":
        raise ConfigError("actadd reads a positional vector from one prompt pair; call actadd(model, tokenizer, ...)")
    if method not in METHODS:
        raise ConfigError(f"unknown extraction method {method!r}; expected one of {METHODS}")
    if unit not in UNITS:
        raise ConfigError(f"unknown unit {unit!r}; expected one of {UNITS}")
    opts = _options(method, options)
    if not isinstance(positive, dict) or not isinstance(negative, dict) or not positive:
        raise DataError("activations must be non-empty dicts {site: tensor [N, d]} for each side")
    if set(positive) != set(negative):
        raise DataError(f"positive sites {sorted(positive)} differ from negative sites {sorted(negative)}")
    warnings = list(warnings or [])
    directions, per_site, counts = {}, {}, None
    for site in positive:
        p, n = _check_pair_tensors(positive[site], negative[site], site)
        if counts is None:
            counts = len(p)
        elif len(p) != counts:
            raise DataError(f"site {site}: {len(p)} pairs, but other sites have {counts}")
        diff = (p.mean(0) - n.mean(0)).float()
        h = hidden_norm.get(site) if hidden_norm else None
        h = float(torch.cat([p, n]).norm(dim=1).mean()) if h is None else float(h)
        info = {"hidden_norm": h, "mean_diff_norm": float(diff.norm()),
                "mean_diff_relative": float(diff.norm()) / max(h, _EPS),
                "consistency": difference_consistency(p, n)}
        if method == "mean_diff":
            v = diff
        elif method == "pca":
            v, info["explained_variance"] = pca_direction(p, n, opts["variant"], opts["sign"])
            info["cosine_to_mean_diff"] = _cosine(v, diff)
            if info["cosine_to_mean_diff"] < LOW_PCA_COSINE:
                warnings.append(f"site {site}: the PCA ({opts['variant']}) direction has cosine "
                                f"{info['cosine_to_mean_diff']:.2f} to the mean difference (below {LOW_PCA_COSINE}); "
                                "it may not steer towards the contrast (mean_diff is the safer default)")
        else:
            v, info["accuracy"] = logistic_direction(p, n, l2=opts["l2"], steps=opts["steps"])
            info["cosine_to_mean_diff"] = _cosine(v, diff)
        directions[site] = v.contiguous()
        per_site[site] = info
    config = {k: v for k, v in opts.items() if k != "norm_reference"}
    if method == "mean_diff" and opts["normalize"] is not None:
        directions = _normalize_mean_diff(directions, opts["normalize"], opts["norm_reference"])
        config["normalized"] = "cross_behaviour"
    for site, v in directions.items():
        info = per_site[site]
        info["norm"] = float(v.norm())
        info["relative_norm"] = info["norm"] / max(info["hidden_norm"], _EPS)
    scales = {f"{s}/{kind}": per_site[s][kind] for s in directions for kind in ("mean_diff_norm", "hidden_norm")}
    for w in warnings:
        log.warning("%s", w)
    report = {"method": method, "options": config, "sites": per_site, "layers": _layers(directions),
              "read": read, "counts": {"positive": counts, "negative": counts},
              "direction_kind": "raw" if method == "mean_diff" else "unit", "warnings": warnings,
              "timing": {"read_s": read_seconds, "fit_s": time.perf_counter() - start}}
    log.info("%s vector at %d sites from %d pairs", method, len(directions), counts)
    return SteeringVector(directions=directions, method=method, unit=unit, scales=scales,
                          counts={"positive": counts, "negative": counts}, model_hint=dict(model_hint or {}),
                          report=report)


def _normalize_mean_diff(directions: dict, rule, reference) -> dict:
    if rule != "cross_behaviour":
        raise ConfigError(f"unknown normalize={rule!r}; the one rule is 'cross_behaviour' (CAA)")
    if reference is None:
        raise ConfigError("normalize='cross_behaviour' needs norm_reference: the other behaviours' SteeringVectors "
                          "(the target is the mean norm over them and this one), or the target norm (a float or "
                          "{site: norm})")
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        target = {s: float(reference) for s in directions}
    elif isinstance(reference, dict):
        missing = set(directions) - set(reference)
        if missing:
            raise ConfigError(f"norm_reference has no target norm for sites {sorted(missing)}")
        target = {s: float(reference[s]) for s in directions}
    else:
        others = list(reference)
        target = {}
        for s, v in directions.items():
            norms = [float(v.double().norm())]
            for i, sv in enumerate(others):
                if s not in getattr(sv, "directions", {}):
                    raise ConfigError(f"norm_reference vector {i} has no direction at site {s}")
                norms.append(float(sv.directions[s].double().norm()))
            target[s] = sum(norms) / len(norms)
    out = {}
    for s, v in directions.items():
        norm = float(v.double().norm())
        if norm <= _EPS:
            raise DataError(f"site {s}: the mean difference is zero and cannot be rescaled")
        out[s] = (v.double() * (target[s] / norm)).float()
    return out


def _layers(directions: dict) -> list:
    layers = []
    for s in directions:
        try:
            site = Site.parse(s)
        except SiteError:
            continue
        if site.layer is not None and site.layer not in layers:
            layers.append(site.layer)
    return layers


def extract(model, tokenizer, pairs, method: str = "mean_diff", *, sites=None, layers=None, read="last",
            chat: bool = False, batch_size: int = 16, padding_side: str = "right", unit: str = "raw",
            progress: bool = False, **options):
    """Read the contrast pairs on `model` and fit a `SteeringVector` (see the module docstring). `pairs`: anything
    `make_pairs(pairs=...)` accepts. `method="actadd"` takes exactly one text pair. `refusal` (text pairs: harmful,
    harmless), `iti` and `lape` (`pairs`: rows {language, text} or {language: [texts]}; options `language`, `edit`,
    `value` and the selection thresholds) go to their modules (`extract_family`)."""
    if method in FAMILY_METHODS:
        return extract_family(model, tokenizer, pairs, method, sites=sites, layers=layers, read=read, chat=chat,
                              batch_size=batch_size, padding_side=padding_side, unit=unit, progress=progress,
                              **options)
    if method == "actadd":
        pairs = make_pairs(pairs=pairs)
        if len(pairs) != 1 or pairs[0].prompt is not None:
            raise DataError(f"actadd takes exactly one (positive, negative) prompt pair, got {len(pairs)} pair(s)"
                            + (" with completions" if pairs and pairs[0].prompt is not None else ""))
        if unit != "raw":
            raise ConfigError(f"actadd vectors are positional and take raw coefficients, not unit={unit!r}")
        return actadd(model, tokenizer, pairs[0].positive, pairs[0].negative, sites=sites, layers=layers, chat=chat,
                      **options)
    if method not in METHODS:
        raise ConfigError(f"unknown extraction method {method!r}; expected one of {METHODS + FAMILY_METHODS}")
    _options(method, options)  # unknown options fail before the forward passes
    acts = read_pairs(model, tokenizer, pairs, sites=sites, layers=layers, read=read, chat=chat,
                      batch_size=batch_size, padding_side=padding_side, progress=progress)
    return from_activations(acts.positive, acts.negative, method, hidden_norm=acts.hidden_norm, unit=unit,
                            read=acts.read, model_hint=base_model_record(model), warnings=acts.warnings,
                            read_seconds=acts.seconds, **options)


def extract_family(model, tokenizer, data, method: str, *, sites=None, layers=None, read="last", chat: bool = False,
                   batch_size: int = 16, padding_side: str = "right", unit: str = "raw", progress: bool = False,
                   **options):
    """`refusal`, `iti` or `lape` through `extract`'s arguments (see `extract`)."""
    if sites is not None:
        raise ConfigError(f"method {method!r} chooses its own sites; give layers=..., not sites=...")
    if unit != "raw":
        raise ConfigError(f"{method} vectors take raw coefficients (unit='raw'), not unit={unit!r}")
    if method == "refusal":
        from .refusal import refusal_direction

        if read != "last":
            raise ConfigError("refusal reads the post-instruction positions itself; leave read at 'last' (use the "
                              "positions option to choose how many)")
        pairs = make_pairs(pairs=data)
        with_prompt = next((i for i, p in enumerate(pairs) if p.prompt is not None), None)
        if with_prompt is not None:
            raise DataError(f"pair {with_prompt}: refusal takes (harmful, harmless) instruction pairs without a prompt")
        return refusal_direction(model, tokenizer, [p.positive for p in pairs], [p.negative for p in pairs],
                                 layers=layers, chat=chat, batch_size=batch_size, progress=progress, **options)
    if method == "iti":
        from .iti import iti

        return iti(model, tokenizer, data, layers=layers, read=read, chat=chat, batch_size=batch_size,
                   padding_side=padding_side, progress=progress, **options)
    if method == "lape":
        from .lape import lape

        if read != "last":
            raise ConfigError("lape counts every ordinary token of each text; leave read at 'last'")
        vector_options = {k: options.pop(k) for k in ("language", "edit", "value") if k in options}
        if "language" not in vector_options:
            raise ConfigError("lape needs the language whose neurons to edit (language=...)")
        neurons = lape(model, tokenizer, data, layers=layers, chat=chat, batch_size=batch_size, progress=progress,
                       **options)
        return neurons.vector(**vector_options)
    raise ConfigError(f"unknown extraction method {method!r}; expected one of {METHODS + FAMILY_METHODS}")


def _space_id(tokenizer) -> int:
    ids = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer encodes ' ' as {len(ids)} tokens; pass pad_token_id=... or pad='truncate'")
    return ids[0]


@torch.no_grad()
def actadd(model, tokenizer, positive: str, negative: str, *, sites=None, layers=None, pad: str = "space",
           pad_token_id: int | None = None, chat: bool = False):
    """ActAdd: the positional difference `[T, d]` of the two prompts' vectors at each site (module docstring)."""
    start = time.perf_counter()
    if pad not in ("space", "truncate"):
        raise ConfigError(f"unknown pad strategy {pad!r}; expected 'space' or 'truncate'")
    pair = make_pairs([positive], [negative])[0]
    seqs = tokenise_pairs(tokenizer, [pair], chat=chat)
    for s in seqs:
        if not s.ids:
            raise DataError(f"pair 0: the {s.side} prompt tokenises to nothing")
    lengths = {s.side: len(s.ids) for s in seqs}
    T = min(lengths.values()) if pad == "truncate" else max(lengths.values())
    fill = None
    if pad == "space" and len(set(lengths.values())) > 1:
        fill = _space_id(tokenizer) if pad_token_id is None else int(pad_token_id)
    for s in seqs:
        s.ids = s.ids[:T] + [fill] * (T - len(s.ids)) if len(s.ids) < T else s.ids[:T]
        s.start = T
    site_list = read_sites(model, sites, layers)
    warnings = [f"site {s.name} reads the hidden state after the final norm" for s in site_list
                if after_final_norm(model, s)]
    everywhere = Positions.all()
    device = _model_device(model)
    bindings = [Binding(s, CollectIntervention(), name=s.name) for s in site_list]
    inputs = {"input_ids": torch.tensor([s.ids for s in seqs], device=device),
              "attention_mask": torch.ones(2, T, dtype=torch.long, device=device)}
    was_training = model.training
    model.eval()
    try:
        with IntervenableModel(model, bindings) as im:
            out = im.run(inputs, positions=everywhere, use_cache=False)
    finally:
        model.train(was_training)
    read_s = time.perf_counter() - start
    directions, per_site = {}, {}
    for s in site_list:
        h = out.collected[s.name].float().cpu()  # [2, T, d]
        v = (h[0].double() - h[1].double()).float()
        hidden = float(h.norm(dim=-1).double().mean())
        norms = v.norm(dim=-1)
        directions[s.name] = v.contiguous()
        per_site[s.name] = {"norm": [float(x) for x in norms], "hidden_norm": hidden,
                            "relative_norm": float(norms.double().mean()) / max(hidden, _EPS),
                            "mean_diff_norm": float(norms.double().mean()),
                            "first_position_norm": float(norms[0])}
    for w in warnings:
        log.warning("%s", w)
    report = {"method": "actadd", "options": {"pad": pad, "pad_token_id": fill, "chat": chat, "length": T,
                                              "tokens": lengths},
              "sites": per_site, "layers": _layers(directions), "read": f"span:0:{T}",
              "counts": {"positive": 1, "negative": 1}, "direction_kind": "raw",
              "warnings": warnings, "timing": {"read_s": read_s, "fit_s": time.perf_counter() - start - read_s}}
    return SteeringVector(directions=directions, method="actadd", scope=f"f{T}@prompt",
                          scales={f"{s}/hidden_norm": per_site[s]["hidden_norm"] for s in directions},
                          counts={"positive": 1, "negative": 1}, model_hint=base_model_record(model), report=report)


# the reading functions stay importable from here, where they used to live
__all__ = ["ContrastActivations", "FAMILY_METHODS", "METHODS", "PCA_VARIANTS", "actadd", "after_final_norm",
           "difference_consistency", "extract", "extract_family", "from_activations", "iter_batches",
           "logistic_direction", "mean_difference", "normalize_across_behaviours", "pca_direction", "read_pairs",
           "read_sequences", "read_sites"]
