"""Methods the steering evaluation compares: steering vectors, ReFT adapters, prompting baselines, the base model.

A *method* says how a model is changed: `VectorMethod` (a `SteeringVector` at a coefficient), `AdapterMethod` (one
adapter of a `ReftModel`), `PromptMethod` (an instruction added through the chat template) and `BaseMethod` (the
model as it is); `ConditionalMethod` is a vector applied only to the rows whose prompt fires a CAST condition.
`method.session(model, coefficient)` is a context manager that yields a `Runner` with `logits`
and `generate`; `method.prompt_ids(tokenizer, prompt)` is the prompt the method sees. Only vectors have a
coefficient; the other methods take `coefficients=None` (or a list of one value, which is recorded and ignored).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..chat import prompt_ids as chat_prompt_ids
from ..errors import ConfigError
from .vector import SteeringVector, check_coefficient

log = logging.getLogger(__name__)


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
            yield Runner(lambda ids, mask, prompt: _steered_logits(s, self.vector, ids, mask, prompt),
                         lambda ids, mask, **kw: s.generate(ids, attention_mask=mask, **kw))

    def describe(self) -> dict:
        return {"method": self.name, "vector": self.vector.method, "sites": self.vector.sites,
                "unit": self.unit or self.vector.unit, "scope": None if self.scope is None else str(self.scope)}


def _steered_logits(s, vector, ids, mask, prompt):
    """Logits of one forward through the steered model `s`: a prompt + completion forward (`prompt` given) edits
    where generation would (`_teacher_forced`); a positional vector edits its first T tokens."""
    inputs = {"input_ids": ids, "attention_mask": mask}
    if prompt is None or vector.positional:
        return s.run(inputs).output.logits
    scope = s.intervenable.bindings[0].positions  # one vector: every site shares its scope
    return s.run(inputs, positions=_teacher_forced(scope, prompt.bool(), mask.bool())).output.logits


class ConditionalMethod(VectorMethod):
    """CAST: a steering vector applied, at each coefficient of the grid, only to the rows whose prompt fires
    `condition` (a `steer.condition.Condition`), decided per row from the row's own real prompt tokens (for a
    neutral text, the whole text). Rows that do not fire run as the base model."""

    name = "conditional"

    def __init__(self, vector: SteeringVector, condition, scope=None, unit: str | None = None):
        super().__init__(vector, scope=scope, unit=unit)
        from .condition import Condition

        if not isinstance(condition, Condition):
            raise ConfigError(f"ConditionalMethod takes a Condition, got {type(condition).__name__}")
        self.condition = condition
        self.fired: list[bool] = []  # every decision made, in order (the report counts them)

    def _rows(self, model, ids, region, coefficient):
        rows = [ids[r][region[r].bool()].tolist() for r in range(ids.shape[0])]
        decisions = self.condition.decide(self.condition.similarities_of_ids(model, rows))
        self.fired += decisions
        return [coefficient if f else None for f in decisions]

    @contextmanager
    def session(self, model, coefficient=None):
        from .apply import steer

        c = check_coefficient(coefficient)

        def forward(ids, mask, prompt):
            rows = self._rows(model, ids, mask if prompt is None else prompt, c)
            if all(r is None for r in rows):
                return model(input_ids=ids, attention_mask=mask).logits
            with steer(model, [(self.vector, rows)], scope=self.scope, unit=self.unit) as s:
                return _steered_logits(s, self.vector, ids, mask, prompt)

        def generate(ids, mask, **kw):
            rows = self._rows(model, ids, mask, c)
            if all(r is None for r in rows):
                return model.generate(input_ids=ids, attention_mask=mask, **kw)
            with steer(model, [(self.vector, rows)], scope=self.scope, unit=self.unit) as s:
                return s.generate(ids, attention_mask=mask, **kw)

        yield Runner(forward, generate)

    def describe(self) -> dict:
        c = self.condition
        return {**super().describe(), "method": self.name,
                "condition": {"site": c.site, "threshold": c.threshold, "aggregate": c.aggregate, "fire": c.fire},
                "fired": sum(self.fired), "decided": len(self.fired)}


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


__all__ = ["AdapterMethod", "BaseMethod", "ConditionalMethod", "Method", "PromptMethod", "Runner", "VectorMethod"]
