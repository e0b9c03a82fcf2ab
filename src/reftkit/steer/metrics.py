"""The steering evaluation's measurements, each for any method (`methods.py`) at one coefficient or a grid.

Metrics (every result is a JSON-able dict; undefined values are `None`, never NaN):
- **Δ log-likelihood** (Pres et al.; `likelihood`): for rows `{prompt, target, other}`, per example
  `log p(target | prompt) - log p(other | prompt)`, summed over the completion's tokens (`per_token=True`: each
  sum divided by its own completion's token count, not by a padded length). Prompt and completion go through one
  forward (right-padded, so every row's positions are its own), edited where generation would edit: a vector's
  scope is resolved on the prompt, and the completion tokens count as generated tokens (edited under `@all` and
  `@generated` scopes, such as `all`, `generated`, `from_instruction_end`), a positional (ActAdd) vector edits the
  first T tokens; an adapter counts its positions over the prompt (`prompt_mask`).
- **Steerability** (Tan et al.; `steerability`): with coefficients `x_j` and an example's propensities `y_ij`
  (its Δ log-likelihood at `x_j`), the example's slope is the least-squares slope
  `Σ_j (x_j - x̄)(y_ij - ȳ_i) / Σ_j (x_j - x̄)²`; `mean_slope` is their mean; `anti_steerable_fraction` is the
  share of examples with slope < 0; `spearman` is Pearson's correlation of the ranks (ties get their average
  rank) of the coefficients and of the mean propensity over examples at each coefficient (`None` when either is
  constant).
- **Behaviour rate**: greedy replies to held-out prompts, the share that pass a `reftkit.behaviours` check.
- **Content retention**: for rows with `answer`, among the facts the base model answers correctly (the `answer`
  check on its greedy reply) the share the steered model still answers correctly; `None` when the base model
  answers none.
- **Side effects on neutral text** (`side_effects`): over every predicted token of the texts (token-weighted),
  the mean `KL(base || steered) = Σ_v p_base(v) (log p_base(v) - log p_steered(v))` of next-token distributions
  (float64; exactly 0 when the logits are identical), and the mean NLL of the steered (and the base) model. A
  text is scored as a continuation, the way the likelihoods score completions: its prompt is the BOS token alone
  (the first token of the text when the tokenizer has no BOS) and, for a prompting method, its instruction
  (`instruction + "\\n\\n"`) after it; the text's tokens count as generated tokens. So a vector edits the text
  where generation would edit a reply (a scope such as `last_prompt_token_then_generated` edits every text token,
  a prompt-only scope only the prompt), an adapter edits that prompt, and the KL is per generated token. Every
  method predicts the same text tokens.
- **distinct-n** (`distinct_n`): per reply, distinct word n-grams over all word n-grams (words: whitespace
  split), averaged over replies; a reply without any n-gram counts 0 (it shows no diversity). `pooled=True`
  counts the n-grams of all replies together instead.
"""

from __future__ import annotations

import logging
import math

import torch

from ..behaviours import behaviour
from ..errors import ConfigError, DataError
from .methods import Runner, _check_method, _plain_runner
from .vector import check_coefficient

log = logging.getLogger(__name__)


# ---- data -----------------------------------------------------------------------------------------------------

def _rows(rows, fields: tuple, what: str) -> list[dict]:
    if rows is None or isinstance(rows, (str, dict)) or not hasattr(rows, "__iter__"):
        raise DataError(f"{what}: expected a list of rows, got {type(rows).__name__}")
    rows = list(rows)
    if not rows:
        raise DataError(f"{what}: no rows")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str) and fields == ("prompt",):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise DataError(f"{what}, row {i}: expected an object with {', '.join(fields)}, got {type(row).__name__}")
        for f in fields:
            if not isinstance(row.get(f), str) or not row[f]:
                raise DataError(f"{what}, row {i}: field {f!r} must be a non-empty string, got {row.get(f)!r}")
        out.append(row)
    return out


def _texts(texts, what: str) -> list[str]:
    return [r["prompt"] for r in _rows(texts, ("prompt",), what)]


# ---- likelihoods ----------------------------------------------------------------------------------------------

def _right_padded(seqs: list[list[int]], pad: int):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def _token_logprobs(runner: Runner, pieces: list[tuple[list[int], list[int]]], pad: int, device, batch_size: int,
                    prompt_is_context: bool = True):
    """For each (context, scored) pair, the float64 log-softmax rows `[len(scored), vocab]` predicting `scored`.
    `prompt_is_context`: the context is the prompt (else the whole sequence is, as for neutral text)."""
    out = []
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start:start + batch_size]
        ids, mask = _right_padded([c + s for c, s in chunk], pad)
        prompt = None
        if prompt_is_context:
            prompt = torch.zeros_like(mask)
            for r, (c, _) in enumerate(chunk):
                prompt[r, :len(c)] = 1
            prompt = prompt.to(device)
        logits = runner.logits(ids.to(device), mask.to(device), prompt).double().log_softmax(-1).cpu()
        for r, (c, s) in enumerate(chunk):
            out.append(logits[r, len(c) - 1:len(c) + len(s) - 1])
    return out


def _completion_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def likelihood(model, tokenizer, method, rows, coefficients=None, *, per_token: bool = False, chat: bool = True,
               batch_size: int = 8) -> dict:
    """Δ log-likelihood of target vs other completions (see the module docstring), per coefficient."""
    method = _check_method(method)
    rows = _rows(rows, ("prompt", "target", "other"), "likelihood rows")
    grid = method.coefficients(coefficients)
    pad, device = _pad_id(tokenizer), _device(model)
    pieces = []
    for i, row in enumerate(rows):
        context = method.prompt_ids(tokenizer, row["prompt"], chat)
        for f in ("target", "other"):
            scored = _completion_ids(tokenizer, row[f])
            if not scored:
                raise DataError(f"likelihood rows, row {i}: {f!r} has no tokens")
            pieces.append((context, scored))
    per_coefficient = []
    for c in grid:
        with method.session(model, c) as runner:
            lps = _token_logprobs(runner, pieces, pad, device, batch_size)
        values, targets, others = [], [], []
        for i in range(len(rows)):
            sums = []
            for k in (2 * i, 2 * i + 1):
                scored = torch.tensor(pieces[k][1])
                lp = lps[k].gather(1, scored[:, None]).sum().item()
                sums.append(lp / len(scored) if per_token else lp)
            targets.append(sums[0])
            others.append(sums[1])
            values.append(sums[0] - sums[1])
        per_coefficient.append({"coefficient": c, "mean": sum(values) / len(values), "delta": values,
                                "logp_target": targets, "logp_other": others})
    log.info("likelihood: %d rows x %d coefficient(s) (%s)", len(rows), len(grid), method.name)
    return {"method": method.describe(), "per_token": per_token, "coefficients": grid,
            "mean": [p["mean"] for p in per_coefficient], "per_coefficient": per_coefficient,
            "per_example": [[p["delta"][i] for p in per_coefficient] for i in range(len(rows))]}


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def steerability(coefficients, propensities) -> dict:
    """Slopes, anti-steerable fraction and Spearman ρ (see the module docstring). `propensities[i][j]` is example
    i's propensity at `coefficients[j]` (the `per_example` of `likelihood`)."""
    xs = [check_coefficient(c) for c in (coefficients or [])]
    if len(set(xs)) < 2:
        raise ConfigError(f"steerability needs at least two distinct coefficients, got {xs}")
    if not propensities:
        raise DataError("steerability: no examples")
    ys = []
    for i, row in enumerate(propensities):
        row = list(row)
        if len(row) != len(xs):
            raise DataError(f"steerability: example {i} has {len(row)} propensities for {len(xs)} coefficients")
        ys.append([_finite(v, f"propensity [{i}][{j}]") for j, v in enumerate(row)])
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    slopes = []
    for row in ys:
        my = sum(row) / len(row)
        slopes.append(sum((x - mx) * (y - my) for x, y in zip(xs, row)) / sxx)
    means = [sum(row[j] for row in ys) / len(ys) for j in range(len(xs))]
    return {"coefficients": xs, "slopes": slopes, "mean_slope": sum(slopes) / len(slopes),
            "anti_steerable_fraction": sum(s < 0 for s in slopes) / len(slopes), "mean_propensity": means,
            "spearman": _pearson(_ranks(xs), _ranks(means))}


# ---- replies --------------------------------------------------------------------------------------------------

def distinct_n(texts, n: int, *, pooled: bool = False) -> float:
    """distinct-n of replies (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"distinct_n: n must be an integer >= 1, got {n!r}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("distinct_n takes a list of strings")
    texts = list(texts)
    if not texts:
        raise DataError("distinct_n: no texts")
    grams = [[tuple(w[k:k + n]) for k in range(len(w) - n + 1)] for w in (t.split() for t in texts)]
    if pooled:
        every = [g for gs in grams for g in gs]
        return len(set(every)) / len(every) if every else 0.0
    return sum(len(set(gs)) / len(gs) if gs else 0.0 for gs in grams) / len(grams)


@torch.no_grad()
def _generate(runner: Runner, tokenizer, ids_list: list[list[int]], device, max_new_tokens: int, batch_size: int,
              generate_kwargs: dict) -> list[str]:
    pad = _pad_id(tokenizer)
    replies = []
    for start in range(0, len(ids_list), batch_size):
        chunk = ids_list[start:start + batch_size]
        T = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, T - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, T - len(x):] = 1
        out = runner.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, **generate_kwargs)
        replies += [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]
    return replies


def replies(model, tokenizer, method, prompts, coefficient=None, *, chat: bool = True, max_new_tokens: int = 32,
            batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Greedy replies of `method` at `coefficient` to `prompts` (strings or rows with a `prompt`)."""
    method = _check_method(method)
    rows = _rows(prompts, ("prompt",), "prompts")
    ids = [method.prompt_ids(tokenizer, r["prompt"], chat) for r in rows]
    with method.session(model, coefficient) as runner:
        return _generate(runner, tokenizer, ids, _device(model), max_new_tokens, batch_size, generate_kwargs)


def behaviour_rate(texts: list[str], check, rows: list[dict] | None = None) -> float:
    """Share of `texts` that pass the behaviour `check` (a spec or a `Behaviour`; `rows` for the `answer` check)."""
    check = behaviour(check)
    if not texts:
        raise DataError("behaviour_rate: no replies")
    rows = rows or [{} for _ in texts]
    check.validate_rows(rows, "behaviour rows")
    return sum(check.check(t, r, i) for i, (t, r) in enumerate(zip(texts, rows))) / len(texts)


def content_retention(base_replies: list[str], steered_replies: list[str], rows: list[dict]) -> dict:
    """Of the facts the base model answers correctly, the share the steered model still answers (the `answer`
    check on both); `retention` is `None` when the base answers none."""
    check = behaviour("answer")
    rows = _rows(rows, ("prompt",), "fact rows")
    check.validate_rows(rows, "fact rows")
    if not (len(base_replies) == len(steered_replies) == len(rows)):
        raise DataError(f"content_retention: {len(base_replies)} base and {len(steered_replies)} steered replies for "
                        f"{len(rows)} rows")
    base_ok = [check.check(t, r, i) for i, (t, r) in enumerate(zip(base_replies, rows))]
    kept = [b and check.check(t, r, i) for i, (t, r, b) in enumerate(zip(steered_replies, rows, base_ok))]
    known = sum(base_ok)
    return {"base_correct": known, "kept": sum(kept), "retention": sum(kept) / known if known else None}


# ---- side effects ---------------------------------------------------------------------------------------------

def _neutral_pieces(tokenizer, method, texts):
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    extra = method.text_prefix(tokenizer)
    base, steered = [], []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise DataError(f"neutral text {i} has fewer than 2 tokens")
        if head:
            base.append((head, ids))
            steered.append((head + extra, ids))
        else:  # no BOS: the first token is context, the rest is scored
            base.append((ids[:1], ids[1:]))
            steered.append((extra + ids[:1], ids[1:]))
    return base, steered


@torch.no_grad()
def side_effects(model, tokenizer, method, coefficient=None, texts=None, *, batch_size: int = 8,
                 _base_cache: dict | None = None) -> dict:
    """KL(base || steered), steered and base NLL per token on neutral `texts` (see the module docstring)."""
    method = _check_method(method)
    texts = _texts(texts, "neutral texts")
    pad, device = _pad_id(tokenizer), _device(model)
    base_pieces, steered_pieces = _neutral_pieces(tokenizer, method, texts)
    if _base_cache is not None and "base" in _base_cache:
        base_lps = _base_cache["base"]
    else:
        base_lps = _token_logprobs(_plain_runner(model), base_pieces, pad, device, batch_size, False)
        if _base_cache is not None:
            _base_cache["base"] = base_lps
    with method.session(model, coefficient) as runner:  # the text as a continuation of its prompt
        steered_lps = _token_logprobs(runner, steered_pieces, pad, device, batch_size, True)
    kl = nll = base_nll = 0.0
    count = 0
    for (_, scored), lb, ls in zip(base_pieces, base_lps, steered_lps):
        idx = torch.tensor(scored)[:, None]
        kl += float((lb.exp() * (lb - ls)).sum())
        nll -= float(ls.gather(1, idx).sum())
        base_nll -= float(lb.gather(1, idx).sum())
        count += len(scored)
    return {"kl": kl / count, "nll": nll / count, "base_nll": base_nll / count, "tokens": count}


# ---- scores ---------------------------------------------------------------------------------------------------

def harmonic_mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    if not values:
        raise DataError("harmonic_mean: no values")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def overall_score(metrics: dict) -> float:
    """The harmonic mean of `behaviour_rate`, `content_retention` (if not None) and `fluency`."""
    for key in ("behaviour_rate", "fluency"):
        if metrics.get(key) is None:
            raise DataError(f"a sweep point needs {key!r}; got {sorted(metrics)}")
    return harmonic_mean([metrics["behaviour_rate"], metrics.get("content_retention"), metrics["fluency"]])


__all__ = ["behaviour_rate", "content_retention", "distinct_n", "harmonic_mean", "likelihood", "overall_score",
           "replies", "side_effects", "steerability"]
