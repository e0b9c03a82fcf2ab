"""Behaviour checks: rules that say whether a generated reply shows a behaviour, so that an adapter (or a
steering vector, or a prompt) is scored by a success rate instead of by a reader's impression.

A check is named by a short spec string, the same in Python, the CLI (`reftkit eval --behaviour SPEC`) and
recipes (`behaviour: SPEC`):

| spec             | a reply passes when                                                                  |
|------------------|--------------------------------------------------------------------------------------|
| `all_caps`       | it has at least three letters and every letter is upper case                         |
| `answer`         | it contains the row's `answer` (a string, or a list of accepted strings), ignoring case and surrounding punctuation/space |
| `json`           | it is one JSON value (a fenced ```json block around it is allowed)                   |
| `contains:TEXT`  | it contains TEXT, ignoring case                                                      |
| `regex:PATTERN`  | Python's `re.search(PATTERN, reply)` finds a match                                   |

Checks are plain data (a name and an argument), built through the table `BEHAVIOURS`; a spec never names Python
objects. `answer` reads each data row, the others only the reply.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError, DataError


def is_all_caps(text: str) -> bool:
    """At least three letters, and every letter upper case."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and all(c.isupper() for c in letters)


def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _contains(reply: str, wanted: str) -> bool:
    wanted = _normal(wanted)
    return bool(wanted) and f" {wanted} " in f" {_normal(reply)} "


def _is_json(reply: str) -> bool:
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _row_answers(row: dict, index: int) -> list[str]:
    answer = row.get("answer")
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return answer
    raise DataError(f"row {index}: the 'answer' check needs an 'answer' field (a string or a list of strings), "
                    f"got {answer!r}")


@dataclass(frozen=True)
class Behaviour:
    """A named check of replies. `check(reply, row, index)` -> bool; `needs_answer` says rows must carry one."""

    spec: str
    test: Callable[[str, dict, int], bool]
    needs_answer: bool = False

    def check(self, reply: str, row: dict | None = None, index: int = 0) -> bool:
        return bool(self.test(reply, row or {}, index))

    def validate_rows(self, rows: list[dict], where: str) -> None:
        """Refuse rows the check cannot score, before any model runs."""
        if self.needs_answer:
            for i, row in enumerate(rows):
                try:
                    _row_answers(row, i)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None


def _plain(name: str, rule: Callable[[str], bool]):
    def make(argument: str | None) -> Behaviour:
        if argument is not None:
            raise ConfigError(f"behaviour {name!r} takes no argument, got {name}:{argument}")
        return Behaviour(name, lambda reply, row, i: rule(reply))
    return make


def _answer(argument: str | None) -> Behaviour:
    if argument is not None:
        raise ConfigError("behaviour 'answer' takes no argument: it reads each row's 'answer' field")
    return Behaviour("answer", lambda reply, row, i: any(_contains(reply, a) for a in _row_answers(row, i)),
                     needs_answer=True)


def _contains_text(argument: str | None) -> Behaviour:
    if not argument:
        raise ConfigError("behaviour 'contains' needs the text to look for: contains:TEXT")
    return Behaviour(f"contains:{argument}", lambda reply, row, i: _contains(reply, argument))


def _regex(argument: str | None) -> Behaviour:
    if not argument:
        raise ConfigError("behaviour 'regex' needs a pattern: regex:PATTERN")
    try:
        pattern = re.compile(argument)
    except re.error as e:
        raise ConfigError(f"behaviour regex:{argument}: not a valid regular expression ({e})") from None
    return Behaviour(f"regex:{argument}", lambda reply, row, i: pattern.search(reply) is not None)


BEHAVIOURS: dict[str, Callable[[str | None], Behaviour]] = {
    "all_caps": _plain("all_caps", is_all_caps),
    "answer": _answer,
    "json": _plain("json", _is_json),
    "contains": _contains_text,
    "regex": _regex,
}


def behaviour(spec: "str | Behaviour") -> Behaviour:
    """The check named by `spec` (see the module docstring)."""
    if isinstance(spec, Behaviour):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a behaviour is a spec string such as 'all_caps' or 'regex:^[A-Z]', got {spec!r}")
    name, sep, argument = spec.strip().partition(":")
    make = BEHAVIOURS.get(name)
    if make is None:
        raise ConfigError(f"unknown behaviour {name!r}; expected one of {', '.join(BEHAVIOURS)} "
                          "(contains and regex take an argument: contains:TEXT, regex:PATTERN)")
    return make(argument if sep else None)
