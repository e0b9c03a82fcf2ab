"""One evaluation protocol for steering vectors, ReFT adapters and prompting baselines.

A *method* says how a model is changed: `VectorMethod` (a `SteeringVector` at a coefficient), `AdapterMethod` (one
adapter of a `ReftModel`), `PromptMethod` (an instruction added through the chat template) and `BaseMethod` (the
model as it is). `method.session(model, coefficient)` is a context manager that yields a `Runner` with `logits`
and `generate`; `method.prompt_ids(tokenizer, prompt)` is the prompt the method sees. Only vectors have a
coefficient; the other methods take `coefficients=None` (or a list of one value, which is recorded and ignored).

Metrics (every result is a JSON-able dict; undefined values are `None`, never NaN):
- **Δ log-likelihood** (Pres et al.; `likelihood`): for rows `{prompt, target, other}`, per example
  `log p(target | prompt) - log p(other | prompt)`, summed over the completion's tokens (`per_token=True`: each
  sum divided by its own completion's token count, not by a padded length). Prompt and completion go through one
  forward (right-padded, so every row's positions are its own), edited where generation would edit: a vector's
  scope is resolved on the prompt, and the completion tokens count as generated tokens (edited under `@all` and
  `@generated` scopes, such as `all`, `generated`, `from_instruction_end`), a positional (ActAdd) vector edits the
  first T tokens; an adapter counts its positions over the prompt (`prompt_mask`). Neutral texts are
  prompts in their own right: scopes and adapter positions count over the whole text.
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
  prompting method scores the text after its instruction (`instruction + "\\n\\n"`), the base model after the BOS
  token alone: both predict the same text tokens.
- **distinct-n** (`distinct_n`): per reply, distinct word n-grams over all word n-grams (words: whitespace
  split), averaged over replies; a reply without any n-gram counts 0 (it shows no diversity). `pooled=True`
  counts the n-grams of all replies together instead.

Sweep (`sweep`): every coefficient is evaluated on the validation half of the prompts and facts (a seeded
permutation; the first ceil(n/2) go to validation), the coefficient with the highest **score** is chosen (ties: the
smallest |coefficient|, then the first in the grid), and the test half is reported at it. The score is the
AxBench-style harmonic mean of the behaviour rate, the content retention (left out when there are no facts or
it is undefined) and a **fluency** term in [0, 1]: `fluency="nll"` (default, needs neutral texts) is
`min(1, exp(nll_base - nll_steered))`, i.e. the base perplexity over the steered perplexity, capped at 1 (1 when
steering costs no perplexity, 0.5 when it doubles it); `fluency="distinct2"` is the replies' distinct-2. A zero
term makes the score 0. A coefficient is flagged as **collapse** when its distinct-2 is below 0.3 and its
behaviour rate is below the highest rate reached at a coefficient of the same sign closer to 0 (or at 0).
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager

import torch

from ..behaviours import Behaviour, behaviour
from ..chat import prompt_ids as chat_prompt_ids
from ..errors import ConfigError, DataError
from .vector import SteeringVector, check_coefficient

log = logging.getLogger(__name__)

COLLAPSE_DISTINCT2 = 0.3
FLUENCY = ("nll", "distinct2")


# ---- methods --------------------------------------------------------------------------------------------------

class Runner:
    """What a method yields: `logits(input_ids, attention_mask, prompt_mask=None)` -> `[batch, seq, vocab]` and
    `generate(...)`. `prompt_mask` marks the prompt of a prompt + completion forward (adapters edit prompt tokens,
    so they count their positions over it); methods that do not use it ignore it."""

    def __init__(self, forward, generate):
        self._forward, self._generate = forward, generate

    def logits(self, input_ids, attention_mask, prompt_mask=None):
        return self._forward(input_ids, attention_mask, prompt_mask)

    def generate(self, input_ids, attention_mask, **kwargs):
        return self._generate(input_ids, attention_mask, **kwargs)


def _plain_runner(model) -> Runner:
    return Runner(lambda ids, mask, prompt: model(input_ids=ids, attention_mask=mask).logits,
                  lambda ids, mask, **kw: model.generate(input_ids=ids, attention_mask=mask, **kw))


class Method:
    """Base class: the model unchanged, the prompt through the chat template."""

    name = "method"
    takes_coefficient = False

    def coefficients(self, coefficients) -> list:
        """The grid this method is evaluated on: a fixed method has one setting (`[None]`, or the one value given)."""
        if coefficients is None:
            return [None]
        values = list(coefficients) if isinstance(coefficients, (list, tuple)) else [coefficients]
        if len(values) != 1:
            raise ConfigError(f"{self.name} has one setting; pass coefficients=None or a list of one value, "
                              f"got {len(values)} values")
        return [None if values[0] is None else check_coefficient(values[0])]

    @contextmanager
    def session(self, model, coefficient=None):
        yield _plain_runner(model)

    def prompt_ids(self, tokenizer, prompt: str, chat: bool = True) -> list[int]:
        return chat_prompt_ids(tokenizer, prompt, chat)

    def text_prefix(self, tokenizer) -> list[int]:
        """Token ids put between the BOS token and a neutral text (a prompting method's instruction)."""
        return []

    def describe(self) -> dict:
        return {"method": self.name}


class BaseMethod(Method):
    """The base model, untouched."""

    name = "base"


class VectorMethod(Method):
    """A steering vector at each coefficient of the grid (`scope` and `unit` as in `steer`)."""

    name = "vector"
    takes_coefficient = True

    def __init__(self, vector: SteeringVector, scope=None, unit: str | None = None):
        if not isinstance(vector, SteeringVector):
            raise ConfigError(f"VectorMethod takes a SteeringVector, got {type(vector).__name__}")
        self.vector, self.scope, self.unit = vector, scope, unit

    def coefficients(self, coefficients) -> list:
        if coefficients is None:
            raise ConfigError("a steering vector is evaluated over a grid of coefficients; pass coefficients=[...]")
        values = list(coefficients) if isinstance(coefficients, (list, tuple)) else [coefficients]
        if not values:
            raise ConfigError("the coefficient grid is empty")
        return [check_coefficient(c) for c in values]

    @contextmanager
    def session(self, model, coefficient=None):
        from .apply import steer

        with steer(model, [(self.vector, check_coefficient(coefficient))], scope=self.scope, unit=self.unit) as s:
            scope = s.intervenable.bindings[0].positions  # one vector: every site shares its scope

            def forward(ids, mask, prompt):
                inputs = {"input_ids": ids, "attention_mask": mask}
                if prompt is None or self.vector.positional:
                    return s.run(inputs).output.logits
                return s.run(inputs, positions=_teacher_forced(scope, prompt.bool(), mask.bool())).output.logits

            yield Runner(forward, lambda ids, mask, **kw: s.generate(ids, attention_mask=mask, **kw))

    def describe(self) -> dict:
        return {"method": self.name, "vector": self.vector.method, "sites": self.vector.sites,
                "unit": self.unit or self.vector.unit, "scope": None if self.scope is None else str(self.scope)}


def _teacher_forced(scope, prompt: torch.Tensor, mask: torch.Tensor):
    """The positions a generation with `scope` edits, for a prompt + completion fed in one forward: the scope's
    selection resolved on the prompt (unless it is `@generated`), plus every completion token (for `@all` and
    `@generated`)."""
    from ..positions import Positions

    selected = torch.zeros_like(mask)
    if scope.scope != "generated":
        loc = scope.resolve(prompt)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(loc.index)
        selected[rows[loc.valid], loc.index[loc.valid]] = True
    if scope.scope in ("all", "generated"):
        selected |= mask & ~prompt
    return Positions.mask(selected, scope="prompt")


class AdapterMethod(Method):
    """One adapter of a `ReftModel` (its base model is the model the protocol compares with)."""

    name = "adapter"

    def __init__(self, reft_model, adapter_name: str | None = None):
        names = getattr(reft_model, "adapter_names", None)
        if names is None or not hasattr(reft_model, "model"):
            raise ConfigError(f"AdapterMethod takes a ReftModel, got {type(reft_model).__name__}")
        adapter_name = adapter_name or reft_model.active_adapter
        if adapter_name not in names:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {names}")
        self.reft_model, self.adapter_name = reft_model, adapter_name

    @contextmanager
    def session(self, model, coefficient=None):
        if model is not self.reft_model.model and model is not self.reft_model:
            raise ConfigError("AdapterMethod: the model evaluated must be the ReftModel's base model")
        reft, name = self.reft_model, self.adapter_name
        if not reft._enabled:
            raise ConfigError("the ReftModel's adapters are disabled; enable them before evaluating an adapter")
        yield Runner(lambda ids, mask, prompt: reft(input_ids=ids, attention_mask=mask, prompt_mask=prompt,
                                                    adapter_names=[name] * ids.shape[0]).logits,
                     lambda ids, mask, **kw: reft.generate(input_ids=ids, attention_mask=mask,
                                                           adapter_names=[name] * ids.shape[0], **kw))

    def describe(self) -> dict:
        return {"method": self.name, "adapter": self.adapter_name}


class PromptMethod(Method):
    """A prompting baseline: `instruction` as a system message (`role="system"`) or prepended to the user's message
    (`role="user"`, or when the chat template refuses a system message, or without a template)."""

    name = "prompt"

    def __init__(self, instruction: str, role: str = "system"):
        if not isinstance(instruction, str) or not instruction.strip():
            raise ConfigError("PromptMethod needs a non-empty instruction")
        if role not in ("system", "user"):
            raise ConfigError(f"PromptMethod role must be 'system' or 'user', got {role!r}")
        self.instruction, self.role = instruction, role

    def prompt_ids(self, tokenizer, prompt: str, chat: bool = True) -> list[int]:
        joined = f"{self.instruction}\n\n{prompt}"
        if chat and getattr(tokenizer, "chat_template", None):
            if self.role == "system":
                try:
                    text = tokenizer.apply_chat_template(
                        [{"role": "system", "content": self.instruction}, {"role": "user", "content": prompt}],
                        tokenize=False, add_generation_prompt=True)
                    return tokenizer(text, add_special_tokens=False)["input_ids"]
                except Exception as e:  # templates that refuse a system turn raise their own error types
                    log.warning("the chat template refuses a system message (%s); prepending the instruction to "
                                "the user's message", e)
            return chat_prompt_ids(tokenizer, joined, True)
        return tokenizer(joined)["input_ids"]

    def text_prefix(self, tokenizer) -> list[int]:
        return tokenizer(f"{self.instruction}\n\n", add_special_tokens=False)["input_ids"]

    def describe(self) -> dict:
        return {"method": self.name, "instruction": self.instruction, "role": self.role}


def _check_method(method) -> Method:
    if not isinstance(method, Method):
        raise ConfigError(f"expected a method (VectorMethod, AdapterMethod, PromptMethod, BaseMethod), got "
                          f"{type(method).__name__}")
    return method


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
    with method.session(model, coefficient) as runner:
        steered_lps = _token_logprobs(runner, steered_pieces, pad, device, batch_size, False)
    kl = nll = base_nll = 0.0
    count = 0
    for (_, scored), lb, ls in zip(base_pieces, base_lps, steered_lps):
        idx = torch.tensor(scored)[:, None]
        kl += float((lb.exp() * (lb - ls)).sum())
        nll -= float(ls.gather(1, idx).sum())
        base_nll -= float(lb.gather(1, idx).sum())
        count += len(scored)
    return {"kl": kl / count, "nll": nll / count, "base_nll": base_nll / count, "tokens": count}


# ---- sweep ----------------------------------------------------------------------------------------------------

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
                 batch_size, generate_kwargs):
        self.model, self.tokenizer, self.method, self.splits = model, tokenizer, method, splits
        self.neutral, self.check, self.fluency, self.chat = neutral, check, fluency, chat
        self.gen = dict(chat=chat, max_new_tokens=max_new_tokens, batch_size=batch_size, **generate_kwargs)
        self.batch_size = batch_size
        self._base: dict = {}
        self._side: dict = {}
        self._base_neutral: dict = {}

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


def sweep(model, tokenizer, method, coefficients, data: dict, *, behaviour_spec="all_caps", seed: int = 0,
          fluency: str = "nll", chat: bool = True, max_new_tokens: int = 32, batch_size: int = 8, per_token=False,
          evaluator=None, **generate_kwargs) -> dict:
    """Evaluate `method` at every coefficient and choose one on validation, report test (module docstring).

    `data`: `prompts` (held-out prompts: strings or rows; required), `facts` (rows with `prompt` and `answer`),
    `neutral` (texts for side effects), `pairs` (rows `{prompt, target, other}`: likelihood and steerability over
    the whole grid). `evaluator(coefficient, split)` -> metrics replaces the model-based sweep point (it must give
    `behaviour_rate` and `fluency`, and may give `content_retention` and `distinct_2`)."""
    method = _check_method(method)
    if fluency not in FLUENCY:
        raise ConfigError(f"fluency must be one of {', '.join(FLUENCY)}, got {fluency!r}")
    if not isinstance(data, dict):
        raise DataError(f"sweep data must be a dict with 'prompts' (and optionally facts, neutral, pairs), got "
                        f"{type(data).__name__}")
    unknown = set(data) - {"prompts", "facts", "neutral", "pairs"}
    if unknown:
        raise DataError(f"sweep data: unknown key(s) {sorted(unknown)}; expected prompts, facts, neutral, pairs")
    grid = method.coefficients(coefficients)
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
    if evaluator is None:
        evaluator = _ModelEvaluator(model, tokenizer, method, {"validation": (pv, fv), "test": (pt, ft)}, neutral,
                                    check, fluency, chat, max_new_tokens, batch_size, generate_kwargs)
    points = []
    for c in grid:
        metrics = dict(evaluator(c, "validation"))
        points.append({"coefficient": c, "metrics": metrics, "score": overall_score(metrics)})
        log.info("sweep %s: coefficient %s, score %.4f", method.name, c, points[-1]["score"])
    _collapse_flags(points)
    best = max(range(len(points)), key=lambda j: (points[j]["score"],
                                                   -abs(points[j]["coefficient"] or 0.0), -j))
    chosen = points[best]["coefficient"]
    test = dict(evaluator(chosen, "test"))
    report = {"method": method.describe(), "behaviour": check.spec, "seed": seed, "fluency": fluency,
              "coefficients": grid, "validation": points, "best_coefficient": chosen,
              "best_validation_score": points[best]["score"],
              "test": {"coefficient": chosen, "metrics": test, "score": overall_score(test)},
              "collapse": [p["coefficient"] for p in points if p["collapse"]],
              "split": {"validation_prompts": len(pv), "test_prompts": len(pt), "validation_facts": len(fv),
                        "test_facts": len(ft)}}
    if data.get("pairs") is not None:
        lik = likelihood(model, tokenizer, method, data["pairs"], coefficients if method.takes_coefficient else None,
                         per_token=per_token, chat=chat, batch_size=batch_size)
        report["likelihood"] = lik
        if method.takes_coefficient and len(set(lik["coefficients"])) >= 2:
            report["steerability"] = steerability(lik["coefficients"], lik["per_example"])
    return report


def plot_sweep(report: dict, path):
    """Behaviour rate, score, distinct-2 and (when measured) KL and NLL against the coefficient, as a PNG."""
    from ..analysis.plots import _matplotlib, save_png

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
    right.set_xlabel("coefficient")
    right.set_title("side effects on neutral text", fontsize=10)
    if right.lines:
        right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_png(fig, path)


__all__ = ["AdapterMethod", "BaseMethod", "Method", "PromptMethod", "Runner", "VectorMethod", "behaviour_rate",
           "content_retention", "distinct_n", "harmonic_mean", "likelihood", "overall_score", "plot_sweep", "replies",
           "side_effects", "split_half", "steerability", "sweep"]
