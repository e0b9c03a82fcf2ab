"""Prompts to token tensors for the analyses, with the checks they share.

Patching compares runs position by position, so every prompt of one call must have the same number of tokens;
a metric reads one next token, so targets must be single tokens; causal tracing corrupts a subject, which must
occur in the prompt. Each check raises `DataError` with the offending tokens and how to fix the input.
"""

from __future__ import annotations

import torch

from ..errors import DataError


def encode(tokenizer, prompts: "str | list[str]") -> torch.Tensor:
    """`input_ids [P, T]` for prompts that all tokenize to the same length (no padding)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise DataError("no prompts given; pass at least one prompt")
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        detail = ", ".join(f"{p!r}: {len(r)}" for p, r in zip(prompts, rows))
        raise DataError(
            f"these prompts tokenize to different lengths ({detail}); the method compares positions one to one, "
            "so rephrase them to the same number of tokens or analyse each length in a separate call"
        )
    if 0 in lengths:
        raise DataError("a prompt tokenized to zero tokens; pass non-empty prompts")
    return torch.tensor(rows, dtype=torch.long)


def as_input_ids(value, tokenizer=None, what: str = "inputs") -> torch.Tensor:
    """Accept strings (with a tokenizer), a `[P, T]` / `[T]` id tensor or a dict with `input_ids` (whose
    attention mask, if any, must be all ones)."""
    if isinstance(value, (str, list, tuple)) and (isinstance(value, str) or all(isinstance(v, str) for v in value)):
        if tokenizer is None:
            raise DataError(f"{what} are strings; pass tokenizer=... to tokenize them")
        return encode(tokenizer, value)
    if isinstance(value, dict):
        mask = value.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise DataError(f"{what} are padded; positions are compared one to one, so give prompts of equal token "
                            "length without padding")
        value = value.get("input_ids")
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.long, torch.int, torch.int32):
        raise DataError(f"{what} must be prompts (with a tokenizer), an input_ids tensor [P, T] or a dict with "
                        "input_ids")
    value = value.long()
    return value.unsqueeze(0) if value.dim() == 1 else value


def same_shape(a: torch.Tensor, b: torch.Tensor, names=("clean", "corrupted")) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{names[0]} inputs are {tuple(a.shape)} but {names[1]} inputs are {tuple(b.shape)} [prompts, tokens]; "
            "pair every prompt with one of the same token length (e.g. swap a name for a name of equal length)"
        )


def single_token(tokenizer, target: "str | int") -> int:
    """The id of a one-token target (a string such as " Paris", or an id)."""
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        hint = f" such as {tokenizer.decode(ids[:1])!r}" if ids else ""
        raise DataError(
            f"target {target!r} is {len(ids)} tokens {pieces}; the metric scores one next token, so pass a "
            f"one-token target{hint} (mind the leading space)"
        )
    return ids[0]


def token_labels(tokenizer, input_ids: torch.Tensor) -> list[str]:
    """Readable labels for the tokens of one prompt."""
    if tokenizer is None:
        return [str(int(i)) for i in input_ids]
    return [tokenizer.decode([int(i)]) for i in input_ids]


def find_subject(tokenizer, prompt: str, subject: str) -> tuple[torch.Tensor, int, int]:
    """`(input_ids [T], start, end)`: the token range `[start, end)` covering the first occurrence of `subject`
    in `prompt` (found by character offsets, so it works whatever the tokenizer does with spaces)."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        raise DataError(f"subject {subject!r} does not occur in the prompt {prompt!r}; pass a subject that is a "
                        "substring of the prompt (same case and spelling)")
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    if offsets is None:
        raise DataError("this tokenizer gives no character offsets; use a fast tokenizer (use_fast=True)")
    stop = at + len(subject)
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < stop and b > at]
    if not inside:
        raise DataError(f"no token of the prompt covers the subject {subject!r}")
    return torch.tensor(ids, dtype=torch.long), inside[0], inside[-1] + 1
