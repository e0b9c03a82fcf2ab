"""Data for ReFT: reading JSONL/CSV rows, tokenising them for one of three tasks, and collating batches.

- `sft` rows have `prompt` and `completion`; the prompt goes through the chat template when the tokenizer has
  one, the completion gets the EOS token, and only completion tokens carry labels.
- `classification` rows have `text` and `label` (an int, or a string mapped through `label_names`).
- `dpo` rows have `prompt`, `chosen` and `rejected`.

The collator pads (right by default, left on request) and emits `prompt_mask`, the prompt's real tokens, from
which intervention positions are counted: nobody offsets positions for padding by hand. Left-padded batches also
carry `position_ids` counted over real tokens (as `generate` does), so absolute position embeddings see the same
positions whichever side is padded.
Bad rows raise `DataError` naming the file, the row number and the field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import prompt_ids
from ..errors import DataError

TASK_FIELDS = {"sft": ("prompt", "completion"), "classification": ("text", "label"), "dpo": ("prompt", "chosen", "rejected")}


def read_rows(path: "str | Path") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = _read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}: not valid CSV after line {reader.line_num} ({e}); expected a header row of "
                            "field names, then one row per example") from e
    elif path.suffix == ".json":
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an int too long to convert, deep nesting
            raise DataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file holds a list of objects")
    else:
        rows = []
        # lines end at "\n" only: JSON strings may hold U+2028 and other characters `splitlines` breaks at
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e})") from e
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte order mark (spreadsheet programs write one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: byte {e.start} is not UTF-8 ({e.reason}); data files must be UTF-8 "
                        "text (re-save the file as UTF-8)") from None


def check_rows(rows: list[dict], task: str, where: str = "data") -> None:
    if task not in TASK_FIELDS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASK_FIELDS)}")
    if not rows:
        raise DataError(f"{where} holds no examples")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{where}, row {i}: expected an object with fields {TASK_FIELDS[task]}, got {type(row).__name__}")
        for f in TASK_FIELDS[task]:
            if f not in row or row[f] is None or (isinstance(row[f], str) and f != "completion" and not row[f].strip()):
                raise DataError(f"{where}, row {i}: missing field {f!r} (a {task} row needs {', '.join(TASK_FIELDS[task])})")
            value = row[f]
            if f == "label":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise DataError(f"{where}, row {i}: label must be an integer or a string (a name in label_names), "
                                    f"got {_show(value)}")
            elif not isinstance(value, str):
                raise DataError(f"{where}, row {i}: field {f!r} must be a string, got {_show(value)}; quote numbers "
                                "and join lists into one text")


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _label_id(label: str, label_names: list[str] | None, where: str) -> int:
    """A string label: an integer written as text ("1", "-1"), else a name in `label_names`."""
    try:
        return int(label)
    except ValueError:
        pass
    if not label_names or label not in label_names:
        raise DataError(f"{where}: label {label!r} is not among label_names {label_names}")
    return label_names.index(label)


def _completion_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class Example:
    prompt: list[int]
    completion: list[int] | None = None  # sft
    label: int | None = None  # classification
    chosen: list[int] | None = None  # dpo
    rejected: list[int] | None = None


def encode(tokenizer, rows: list[dict], task: str = "sft", *, chat: bool = True, max_length: int = 512,
           label_names: list[str] | None = None, where: str = "data") -> list[Example]:
    check_rows(rows, task, where)
    out = []
    for i, row in enumerate(rows, 1):
        if task == "classification":
            ids = tokenizer(str(row["text"]), truncation=False)["input_ids"]
            label = row["label"]
            if isinstance(label, str):
                label = _label_id(label, label_names, f"{where}, row {i}")
            ex = Example(ids, label=label)
            total = len(ids)
        else:
            p = prompt_ids(tokenizer, str(row["prompt"]), chat)
            if task == "sft":
                ex = Example(p, completion=_completion_ids(tokenizer, str(row["completion"])))
                total = len(p) + len(ex.completion)
            else:
                ex = Example(p, chosen=_completion_ids(tokenizer, str(row["chosen"])),
                             rejected=_completion_ids(tokenizer, str(row["rejected"])))
                total = len(p) + max(len(ex.chosen), len(ex.rejected))
        if total > max_length:
            raise DataError(f"{where}, row {i}: {total} tokens is longer than max_length={max_length}; "
                            "shorten the example or raise max_length")
        out.append(ex)
    return out


class Collator:
    """Pads a list of `Example`s into tensors. `padding_side` is "right" (default) or "left". The tensors are built
    on the CPU and moved to `device` when one is given (the model's, for a loop that calls the model directly;
    HF's Trainer moves batches itself)."""

    def __init__(self, pad_token_id: int, task: str = "sft", padding_side: str = "right", device=None):
        if padding_side not in ("left", "right"):
            raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad, self.task, self.side, self.device = pad_token_id, task, padding_side, device

    def _pad(self, seqs: list[list[int]], prompt_lens: list[int], labelled: bool) -> dict:
        T = max(len(s) for s in seqs)
        B = len(seqs)
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        am = torch.zeros(B, T, dtype=torch.long)
        pm = torch.zeros(B, T, dtype=torch.bool)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for i, (s, pl) in enumerate(zip(seqs, prompt_lens)):
            off = T - len(s) if self.side == "left" else 0
            ids[i, off: off + len(s)] = torch.tensor(s)
            am[i, off: off + len(s)] = 1
            pm[i, off: off + pl] = True
            if labelled:
                labels[i, off + pl: off + len(s)] = torch.tensor(s[pl:])
        out = {"input_ids": ids, "attention_mask": am, "prompt_mask": pm}
        if self.side == "left":  # as generate does: real tokens keep the positions they have unpadded
            out["position_ids"] = (am.cumsum(1) - 1).clamp(min=0)
        if labelled:
            out["labels"] = labels
        return out

    def __call__(self, batch: list[Example]) -> dict:
        out = self._collate(batch)
        if self.device is None:
            return out
        return {k: v.to(self.device) for k, v in out.items()}

    def _collate(self, batch: list[Example]) -> dict:
        if self.task == "sft":
            return self._pad([e.prompt + e.completion for e in batch], [len(e.prompt) for e in batch], True)
        if self.task == "classification":
            out = self._pad([e.prompt for e in batch], [len(e.prompt) for e in batch], False)
            out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.long)
            return out
        seqs = [e.prompt + e.chosen for e in batch] + [e.prompt + e.rejected for e in batch]
        return self._pad(seqs, [len(e.prompt) for e in batch] * 2, True)
