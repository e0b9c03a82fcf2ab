"""Several methods on one protocol: the same prompts, facts, neutral texts and validation/test halves for every
steering vector, ReFT adapter, prompting baseline and the base model, as one report with a summary table.

Each entry is `{"name", "method": Method, "coefficients": grid or None}`, and for a layers × strengths sweep
`{"name", "vector": SteeringVector, "sites": [...], "coefficients", "scope", "unit"}` (a layer sweep scores no
likelihood pairs). Every entry is evaluated with
`sweep.sweep` (or `sweep.layer_sweep`) under the same options; base replies and base log-probabilities on the
neutral texts are computed once for all entries. `table` gives one row per entry from its test half: the chosen
coefficient (and site), behaviour rate, content retention, fluency, KL and NLL on neutral text, distinct-2, the
score, and the steerability slope and anti-steerable fraction where a grid of coefficients was scored on pairs.
"""

from __future__ import annotations

import logging
import time

from ..errors import ConfigError
from .methods import Method
from .sweep import layer_sweep, sweep

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("method", "coefficient", "behaviour", "retention", "fluency", "kl", "nll", "distinct_2", "score",
                 "slope", "anti_steerable")


def compare(model, tokenizer, entries: list[dict], data: dict, *, behaviour_spec="all_caps", seed: int = 0,
            fluency: str = "nll", kl_budget: float | None = None, chat: bool = True, max_new_tokens: int = 32,
            batch_size: int = 8, progress=None) -> dict:
    """Evaluate every entry (module docstring) and return `{"methods": {name: report}, "table": [...], ...}`.
    `progress(name, index, total)` is called before each entry."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError("compare needs a non-empty list of method entries")
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"every entry needs its own non-empty name, got {names}")
    options = dict(behaviour_spec=behaviour_spec, seed=seed, fluency=fluency, kl_budget=kl_budget, chat=chat,
                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    shared: dict = {}
    reports, seconds = {}, {}
    for i, entry in enumerate(entries):
        name = entry["name"]
        if progress is not None:
            progress(name, i, len(entries))
        start = time.perf_counter()
        if entry.get("sites") is not None:
            report = layer_sweep(model, tokenizer, entry["vector"], entry["coefficients"],
                                 {k: v for k, v in data.items() if k != "pairs"}, sites=entry["sites"],
                                 scope=entry.get("scope"), unit=entry.get("unit"), **options)
        else:
            method = entry.get("method")
            if not isinstance(method, Method):
                raise ConfigError(f"entry {name!r}: expected a Method under 'method', got {type(method).__name__}")
            report = sweep(model, tokenizer, method, entry.get("coefficients"), data, _shared=shared, **options)
        seconds[name] = time.perf_counter() - start
        reports[name] = report
        log.info("%s: test score %.4f (%.1f s)", name, report["test"]["score"], seconds[name])
    return {"behaviour": behaviour_spec, "seed": seed, "fluency": fluency, "kl_budget": kl_budget,
            "methods": reports, "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "table": [table_row(name, r) for name, r in reports.items()]}


def table_row(name: str, report: dict) -> dict:
    """One summary row of a sweep (or layer sweep) report, from its test half."""
    m = report["test"]["metrics"]
    coefficient = report["test"].get("coefficient")
    if report["test"].get("site") is not None:
        coefficient = f"{report['test']['site']}@{coefficient:g}"
    steer = report.get("steerability") or {}
    return {"method": name, "coefficient": coefficient, "behaviour": m["behaviour_rate"],
            "retention": m.get("content_retention"), "fluency": m.get("fluency"), "kl": m.get("kl"),
            "nll": m.get("nll"), "distinct_2": m.get("distinct_2"), "score": report["test"]["score"],
            "slope": steer.get("mean_slope"), "anti_steerable": steer.get("anti_steerable_fraction"),
            "within_budget": (report.get("kl_budget") or {}).get("met")}


__all__ = ["TABLE_COLUMNS", "compare", "table_row"]
