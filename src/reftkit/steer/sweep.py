"""Coefficient sweeps: choose a method's coefficient on a validation half, report it on the test half.

Sweep (`sweep`): every coefficient is evaluated on the validation half of the prompts and facts (a seeded
permutation; the first ceil(n/2) go to validation), the coefficient with the highest **score** is chosen (ties: the
smallest |coefficient|, then the first in the grid), and the test half is reported at it. The score is the
AxBench-style harmonic mean of the behaviour rate, the content retention (left out when there are no facts or
it is undefined) and a **fluency** term in [0, 1]: `fluency="nll"` (default, needs neutral texts) is
`min(1, exp(nll_base - nll_steered))`, i.e. the base perplexity over the steered perplexity, capped at 1 (1 when
steering costs no perplexity, 0.5 when it doubles it); `fluency="distinct2"` is the replies' distinct-2. A zero
term makes the score 0. A coefficient is flagged as **collapse** when its distinct-2 is below 0.3 and its
behaviour rate is below the highest rate reached at a coefficient of the same sign closer to 0 (or at 0).

KL budget (`kl_budget`, nats per token): only the coefficients whose validation KL(base || steered) on the neutral
texts (`side_effects`) is at most the budget compete; when none is within it, the coefficient with the smallest
KL is reported with `kl_budget.met = false`, so a report never hides that the budget could not be kept.

Layers × strengths (`layer_sweep`): each site of a multi-site vector is applied alone (`single_site`) at every
coefficient on the validation half; the best (site, coefficient) over all of them under the budget is reported
on the test half. Per site, the validation points are the frontier of behaviour against KL.
"""

from __future__ import annotations

import logging
import math
import random

from ..behaviours import Behaviour, behaviour
from ..errors import ConfigError, DataError
from .methods import BaseMethod, _check_method
from .vector import SteeringVector
from .metrics import (_rows, _texts, behaviour_rate, content_retention, distinct_n, likelihood, overall_score,
                      replies, side_effects, steerability)

log = logging.getLogger(__name__)

COLLAPSE_DISTINCT2 = 0.3
FLUENCY = ("nll", "distinct2")


def split_half(rows: list, seed: int) -> tuple[list, list]:
    """A seeded permutation of `rows`: the first ceil(n/2) for validation, the rest for test."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = (len(rows) + 1) // 2
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _collapse_flags(points: list[dict]) -> None:
    """Mark `collapse` on each point (see the module docstring); points carry `coefficient` and metrics."""
    for p in points:
        c, d2 = p["coefficient"], p["metrics"].get("distinct_2")
        earlier = [q["metrics"]["behaviour_rate"] for q in points
                   if q is not p and (c is not None and q["coefficient"] is not None)
                   and (q["coefficient"] == 0 or (q["coefficient"] * c > 0 and abs(q["coefficient"]) < abs(c)))]
        falls = bool(earlier) and p["metrics"]["behaviour_rate"] < max(earlier)
        p["collapse"] = bool(d2 is not None and d2 < COLLAPSE_DISTINCT2 and falls)


class _ModelEvaluator:
    """The default sweep point: replies, behaviour, retention, distinct-n and side effects on one split."""

    def __init__(self, model, tokenizer, method, splits, neutral, check: Behaviour, fluency, chat, max_new_tokens,
                 batch_size, generate_kwargs, shared: dict | None = None):
        self.model, self.tokenizer, self.method, self.splits = model, tokenizer, method, splits
        self.neutral, self.check, self.fluency, self.chat = neutral, check, fluency, chat
        self.gen = dict(chat=chat, max_new_tokens=max_new_tokens, batch_size=batch_size, **generate_kwargs)
        self.batch_size = batch_size
        shared = {} if shared is None else shared  # base replies and base log-probs, shared by several methods
        self._base: dict = shared.setdefault("replies", {})
        self._side: dict = {}
        self._base_neutral: dict = shared.setdefault("neutral", {})

    def _base_replies(self, key, rows):
        if key not in self._base:
            self._base[key] = replies(self.model, self.tokenizer, BaseMethod(), rows, **self.gen)
        return self._base[key]

    def __call__(self, coefficient, split: str) -> dict:
        prompts, facts = self.splits[split]
        out = {}
        said = replies(self.model, self.tokenizer, self.method, prompts, coefficient, **self.gen)
        out["behaviour_rate"] = behaviour_rate(said, self.check, prompts)
        out["base_behaviour_rate"] = behaviour_rate(self._base_replies((split, "prompts"), prompts), self.check,
                                                    prompts)
        out["distinct_1"], out["distinct_2"] = distinct_n(said, 1), distinct_n(said, 2)
        out["content_retention"] = None
        if facts:
            steered = replies(self.model, self.tokenizer, self.method, facts, coefficient, **self.gen)
            kept = content_retention(self._base_replies((split, "facts"), facts), steered, facts)
            out["content_retention"] = kept["retention"]
            out["facts_base_correct"] = kept["base_correct"]
        if self.neutral:
            key = repr(coefficient)
            if key not in self._side:
                self._side[key] = side_effects(self.model, self.tokenizer, self.method, coefficient, self.neutral,
                                               batch_size=self.batch_size, _base_cache=self._base_neutral)
            out.update(self._side[key])
        if self.fluency == "nll" and self.neutral:
            out["fluency"] = min(1.0, math.exp(out["base_nll"] - out["nll"]))
        else:
            out["fluency"] = out["distinct_2"]
        out["replies"] = said
        return out


def _sweep_data(data, behaviour_spec, seed: int):
    """The checked rows of `data`, split: -> (splits, neutral texts, behaviour check, split sizes)."""
    if not isinstance(data, dict):
        raise DataError(f"sweep data must be a dict with 'prompts' (and optionally facts, neutral, pairs), got "
                        f"{type(data).__name__}")
    unknown = set(data) - {"prompts", "facts", "neutral", "pairs"}
    if unknown:
        raise DataError(f"sweep data: unknown key(s) {sorted(unknown)}; expected prompts, facts, neutral, pairs")
    prompts = _rows(data.get("prompts"), ("prompt",), "sweep prompts")
    if len(prompts) < 2:
        raise DataError("sweep prompts: at least 2 are needed (a validation and a test half)")
    facts = _rows(data["facts"], ("prompt",), "sweep facts") if data.get("facts") is not None else []
    if facts:
        behaviour("answer").validate_rows(facts, "sweep facts")
        if len(facts) < 2:
            raise DataError("sweep facts: at least 2 are needed (a validation and a test half)")
    neutral = _texts(data["neutral"], "sweep neutral texts") if data.get("neutral") is not None else []
    check = behaviour(behaviour_spec)
    check.validate_rows(prompts, "sweep prompts")
    pv, pt = split_half(prompts, seed)
    fv, ft = split_half(facts, seed + 1) if facts else ([], [])
    sizes = {"validation_prompts": len(pv), "test_prompts": len(pt), "validation_facts": len(fv),
             "test_facts": len(ft)}
    return {"validation": (pv, fv), "test": (pt, ft)}, neutral, check, sizes


def _check_options(fluency: str, kl_budget, neutral, evaluator) -> float | None:
    if fluency not in FLUENCY:
        raise ConfigError(f"fluency must be one of {', '.join(FLUENCY)}, got {fluency!r}")
    if kl_budget is None:
        return None
    if isinstance(kl_budget, bool) or not isinstance(kl_budget, (int, float)) or not math.isfinite(kl_budget) \
            or kl_budget < 0:
        raise ConfigError(f"kl_budget must be a finite number >= 0 (nats per token), got {kl_budget!r}")
    if not neutral and evaluator is None:
        raise ConfigError("a KL budget needs neutral texts (data['neutral']) to measure the KL to the base model on")
    return float(kl_budget)


def _choose(points: list[dict], kl_budget: float | None) -> tuple[int, bool]:
    """The index of the best point and whether it is within the KL budget. Under a budget only points whose
    validation `kl` is at most the budget compete (by score; ties: the smallest |coefficient|, then the first);
    when none is, the point with the smallest KL is taken and the budget is reported as not met."""
    for p in points:
        kl = p["metrics"].get("kl")
        p["within_budget"] = None if kl_budget is None else (kl is not None and kl <= kl_budget)
    eligible = [j for j, p in enumerate(points) if kl_budget is None or p["within_budget"]]
    if not eligible:
        def kl(j):
            value = points[j]["metrics"].get("kl")
            return math.inf if value is None else value

        best = min(range(len(points)), key=lambda j: (kl(j), j))
        return best, False
    return max(eligible, key=lambda j: (points[j]["score"], -abs(points[j]["coefficient"] or 0.0), -j)), True


def sweep(model, tokenizer, method, coefficients, data: dict, *, behaviour_spec="all_caps", seed: int = 0,
          fluency: str = "nll", chat: bool = True, max_new_tokens: int = 32, batch_size: int = 8, per_token=False,
          kl_budget: float | None = None, evaluator=None, _shared: dict | None = None, **generate_kwargs) -> dict:
    """Evaluate `method` at every coefficient and choose one on validation, report test (module docstring).

    `data`: `prompts` (held-out prompts: strings or rows; required), `facts` (rows with `prompt` and `answer`),
    `neutral` (texts for side effects), `pairs` (rows `{prompt, target, other}`: likelihood and steerability over
    the whole grid). `kl_budget` (nats per token, on the neutral texts): only coefficients within it are chosen.
    `evaluator(coefficient, split)` -> metrics replaces the model-based sweep point (it must give
    `behaviour_rate` and `fluency`, and may give `content_retention`, `distinct_2` and `kl`)."""
    method = _check_method(method)
    grid = method.coefficients(coefficients)
    splits, neutral, check, sizes = _sweep_data(data, behaviour_spec, seed)
    kl_budget = _check_options(fluency, kl_budget, neutral, evaluator)
    if evaluator is None:
        evaluator = _ModelEvaluator(model, tokenizer, method, splits, neutral, check, fluency, chat, max_new_tokens,
                                    batch_size, generate_kwargs, shared=_shared)
    points = []
    for c in grid:
        metrics = dict(evaluator(c, "validation"))
        points.append({"coefficient": c, "metrics": metrics, "score": overall_score(metrics)})
        log.info("sweep %s: coefficient %s, score %.4f", method.name, c, points[-1]["score"])
    _collapse_flags(points)
    best, met = _choose(points, kl_budget)
    chosen = points[best]["coefficient"]
    test = dict(evaluator(chosen, "test"))
    report = {"method": method.describe(), "behaviour": check.spec, "seed": seed, "fluency": fluency,
              "coefficients": grid, "validation": points, "best_coefficient": chosen,
              "best_validation_score": points[best]["score"],
              "test": {"coefficient": chosen, "metrics": test, "score": overall_score(test)},
              "collapse": [p["coefficient"] for p in points if p["collapse"]], "split": sizes}
    if kl_budget is not None:
        report["kl_budget"] = {"budget": kl_budget, "met": met}
    if data.get("pairs") is not None:
        lik = likelihood(model, tokenizer, method, data["pairs"], coefficients if method.takes_coefficient else None,
                         per_token=per_token, chat=chat, batch_size=batch_size)
        report["likelihood"] = lik
        if method.takes_coefficient and len(set(lik["coefficients"])) >= 2:
            report["steerability"] = steerability(lik["coefficients"], lik["per_example"])
    return report


def single_site(vector: SteeringVector, site: str) -> SteeringVector:
    """The part of `vector` at one of its sites (its scales and site-keyed operator config narrowed to it)."""
    from ..sites import Site

    name = Site.parse(site).name
    if name not in vector.directions:
        raise ConfigError(f"the vector has no site {name}; it has {', '.join(vector.sites)}")
    config = {}
    for key, value in vector.operator_config.items():
        if isinstance(value, dict) and value and set(value) <= set(vector.sites):
            if name in value:
                config[key] = {name: value[name]}
            continue
        config[key] = value
    scales = {k: v for k, v in vector.scales.items() if k.rpartition("/")[0] == name}
    return vector._replace({name: vector.directions[name]}, scales=scales, operator_config=config)


def layer_sweep(model, tokenizer, vector: SteeringVector, coefficients, data: dict, *, sites=None,
                kl_budget: float | None = None, scope=None, unit: str | None = None, behaviour_spec="all_caps",
                seed: int = 0, fluency: str = "nll", chat: bool = True, max_new_tokens: int = 32,
                batch_size: int = 8, **generate_kwargs) -> dict:
    """Layers × strengths: each of `vector`'s sites (or `sites`, a subset) applied alone at every coefficient on
    the validation half; the best (site, coefficient) by score among the points within `kl_budget` (nats per token
    of KL to the base on the neutral texts; every point when None) is reported on the test half. Base replies and
    base log-probabilities are computed once for all sites. The report has one `sweep` report per site (its
    `validation` points are the frontier: behaviour against KL) and the choice over all of them."""
    from .methods import VectorMethod

    if not isinstance(vector, SteeringVector):
        raise ConfigError(f"layer_sweep takes a SteeringVector, got {type(vector).__name__}")
    names = vector.sites if sites is None else sites
    if isinstance(names, str) or not names:
        raise ConfigError(f"sites must be a non-empty list of the vector's sites, got {names!r}")
    parts = [single_site(vector, s) for s in names]
    splits, neutral, _, _ = _sweep_data(data, behaviour_spec, seed)  # checked before the first forward
    kl_budget = _check_options(fluency, kl_budget, neutral, None)
    grid = VectorMethod(parts[0]).coefficients(coefficients)
    shared: dict = {}
    per_site, candidates = {}, []
    for part in parts:
        site = part.sites[0]
        method = VectorMethod(part, scope=scope, unit=unit)
        evaluator = _ModelEvaluator(model, tokenizer, method, splits, neutral, behaviour(behaviour_spec), fluency,
                                    chat, max_new_tokens, batch_size, generate_kwargs, shared=shared)
        points = []
        for c in grid:
            metrics = dict(evaluator(c, "validation"))
            points.append({"site": site, "coefficient": c, "metrics": metrics, "score": overall_score(metrics)})
            log.info("layer sweep %s: coefficient %s, score %.4f, KL %s", site, c, points[-1]["score"],
                     metrics.get("kl"))
        _collapse_flags(points)
        best, met = _choose(points, kl_budget)
        per_site[site] = {"best_coefficient": points[best]["coefficient"], "best_validation_score":
                          points[best]["score"], "within_budget": met, "validation": points,
                          "evaluator": evaluator}
        candidates += points
    best, met = _choose(candidates, kl_budget)
    site, chosen = candidates[best]["site"], candidates[best]["coefficient"]
    test = dict(per_site[site]["evaluator"](chosen, "test"))
    for entry in per_site.values():
        del entry["evaluator"]
    return {"method": {"method": "vector", "vector": vector.method, "sites": list(per_site),
                       "unit": unit or vector.unit, "scope": None if scope is None else str(scope)},
            "behaviour": behaviour(behaviour_spec).spec, "seed": seed, "fluency": fluency, "coefficients": grid,
            "kl_budget": None if kl_budget is None else {"budget": kl_budget, "met": met},
            "sites": per_site, "best_site": site, "best_coefficient": chosen,
            "best_validation_score": candidates[best]["score"],
            "test": {"site": site, "coefficient": chosen, "metrics": test, "score": overall_score(test)},
            "split": {k: len(v) for k, v in zip(("validation_prompts", "validation_facts"), splits["validation"])}
            | {k: len(v) for k, v in zip(("test_prompts", "test_facts"), splits["test"])}}


def plot_sweep(report: dict, path):
    """Behaviour rate, score, distinct-2 and (when measured) KL and NLL against the coefficient, as a PNG. A
    `layer_sweep` report gets one line per site: behaviour rate on the left, KL (and the budget) on the right."""
    from ..analysis.plots import _matplotlib, save_png

    if isinstance(report, dict) and isinstance(report.get("sites"), dict):
        return _plot_layers(report, path)
    points = report.get("validation") if isinstance(report, dict) else None
    if not points or any(p.get("coefficient") is None for p in points):
        raise DataError("plot_sweep needs a sweep report over numeric coefficients")
    figure_class, _ = _matplotlib()
    xs = [p["coefficient"] for p in points]
    order = sorted(range(len(xs)), key=lambda j: xs[j])
    xs = [xs[j] for j in order]

    def series(key):
        values = [points[j]["metrics"].get(key) if key != "score" else points[j]["score"] for j in order]
        return None if any(v is None for v in values) else values

    fig = figure_class(figsize=(9, 3.5), dpi=110)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key in ("behaviour_rate", "content_retention", "fluency", "distinct_2", "score"):
        values = series(key)
        if values is not None:
            left.plot(xs, values, marker="o", markersize=3, label=key)
    left.axvline(report["best_coefficient"], color="grey", linestyle=":", linewidth=1)
    for c in report.get("collapse", []):
        left.axvline(c, color="red", alpha=0.3, linewidth=3)
    left.set_xlabel("coefficient")
    left.set_title("behaviour (validation)", fontsize=10)
    left.legend(fontsize=7)
    for key in ("kl", "nll", "base_nll"):
        values = series(key)
        if values is not None:
            right.plot(xs, values, marker="o", markersize=3, label=key)
    budget = (report.get("kl_budget") or {}).get("budget")
    if budget is not None and series("kl") is not None:
        right.axhline(budget, color="grey", linestyle="--", linewidth=1, label="KL budget")
    right.set_xlabel("coefficient")
    right.set_title("side effects on neutral text", fontsize=10)
    if right.lines:
        right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def _plot_layers(report: dict, path):
    from ..analysis.plots import _matplotlib, save_png

    figure_class, _ = _matplotlib()
    fig = figure_class(figsize=(9, 3.5), dpi=110)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for site, entry in report["sites"].items():
        points = sorted(entry["validation"], key=lambda p: p["coefficient"])
        xs = [p["coefficient"] for p in points]
        left.plot(xs, [p["metrics"]["behaviour_rate"] for p in points], marker="o", markersize=3, label=site)
        kls = [p["metrics"].get("kl") for p in points]
        if all(k is not None for k in kls):
            right.plot(xs, kls, marker="o", markersize=3, label=site)
    budget = (report.get("kl_budget") or {}).get("budget")
    if budget is not None:
        right.axhline(budget, color="grey", linestyle="--", linewidth=1, label="KL budget")
    left.set_title(f"behaviour (validation); chosen {report['best_site']} at {report['best_coefficient']:g}",
                   fontsize=9)
    right.set_title("KL to the base on neutral text (nats/token)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("coefficient")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save_png(fig, path)


__all__ = ["COLLAPSE_DISTINCT2", "FLUENCY", "layer_sweep", "plot_sweep", "single_site", "split_half", "sweep"]
