"""Contrastive data for steering-vector extraction: pairs, their tokens, and where each one is read.

A `ContrastPair` is either two texts (`positive`, `negative`) or a prompt with two completions (`prompt` set,
`positive`/`negative` are the completions). `make_pairs` accepts the shapes people keep their data in and
checks them once, naming the pair and field at fault.

Decisions:
- **Tokens.** A text pair is tokenised as the tokenizer does by default (BOS and all), or through the chat
  template as a user turn with the assistant turn opened (`chat=True`, via `reftkit.chat.prompt_ids`). With a
  prompt, the prompt is tokenised that way and each completion is tokenised on its own without special tokens
  and appended, so both completions share the prompt's tokens exactly and the completion starts at a known
  offset (CAA builds its A/B pairs the same way: one question, two appended answers).
- **Read positions** (`read=`), counted over real tokens, so padding never matters:
  `"last"` the last token; `"answer"` the first completion token (the CAA answer letter when the completion
  is the letter); `"completion_mean"` the mean over the completion tokens; or any `Positions` selector
  (`"l3"`, `"f1"`, `"span:2:5"`, `Positions(...)`), whose tokens are averaged when it selects several.
  `"answer"` and `"completion_mean"` need a prompt and completions.
- A sequence that has nothing at the read position (an empty completion, an empty text) is a `DataError`
  that names the pair index and the side, before any forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chat import prompt_ids
from ..errors import DataError, PositionError
from ..positions import Positions

READ_MODES = ("last", "answer", "completion_mean")
SIDES = ("positive", "negative")


@dataclass(frozen=True)
class ContrastPair:
    positive: str
    negative: str
    prompt: str | None = None  # set: positive / negative are completions of this prompt


def make_pairs(positives=None, negatives=None, *, prompts=None, pairs=None) -> list[ContrastPair]:
    """Contrast pairs from `pairs` (ContrastPair, `(positive, negative)`, `(prompt, positive, negative)` or dicts
    with those keys) or from parallel lists `positives`, `negatives` (and optionally `prompts`: one prompt per
    pair, or one string for every pair)."""
    if pairs is not None:
        if positives is not None or negatives is not None or prompts is not None:
            raise DataError("give either pairs=... or positives/negatives (and prompts), not both")
        out = [_one_pair(i, p) for i, p in enumerate(_as_list(pairs, "pairs"))]
    else:
        if positives is None or negatives is None:
            raise DataError("give pairs=... or both positives=... and negatives=...")
        positives, negatives = _as_list(positives, "positives"), _as_list(negatives, "negatives")
        if len(positives) != len(negatives):
            raise DataError(f"got {len(positives)} positive and {len(negatives)} negative examples; contrastive "
                            "extraction needs one negative per positive")
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts] * len(positives)
        else:
            prompts = _as_list(prompts, "prompts")
            if len(prompts) != len(positives):
                raise DataError(f"got {len(prompts)} prompts for {len(positives)} pairs; give one prompt per pair "
                                "(or one string for all)")
        out = [_one_pair(i, ContrastPair(p, n, q)) for i, (p, n, q) in enumerate(zip(positives, negatives, prompts))]
    if not out:
        raise DataError("no contrast pairs given; extraction needs at least one (positive, negative) pair")
    return out


def _as_list(value, what: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DataError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _one_pair(i: int, p) -> ContrastPair:
    if isinstance(p, dict):
        unknown = set(p) - {"positive", "negative", "prompt"}
        if unknown or "positive" not in p or "negative" not in p:
            raise DataError(f"pair {i}: expected keys 'positive', 'negative' (and optionally 'prompt'), "
                            f"got {sorted(p)}")
        p = ContrastPair(p["positive"], p["negative"], p.get("prompt"))
    elif isinstance(p, (tuple, list)):
        if len(p) == 2:
            p = ContrastPair(p[0], p[1])
        elif len(p) == 3:
            p = ContrastPair(p[1], p[2], p[0])
        else:
            raise DataError(f"pair {i}: expected (positive, negative) or (prompt, positive, negative), "
                            f"got {len(p)} items")
    elif not isinstance(p, ContrastPair):
        raise DataError(f"pair {i}: expected a ContrastPair, tuple or dict, got {type(p).__name__}")
    for field in ("positive", "negative", "prompt"):
        value = getattr(p, field)
        if field == "prompt" and value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"pair {i}: field {field!r} must be a string, got {type(value).__name__}")
    return p


@dataclass
class Sequence:
    """One tokenised side of one pair: `ids`, and `start`, the offset of the first completion token (its
    length when there is no completion)."""

    ids: list[int]
    start: int
    pair: int
    side: str


def tokenise_pairs(tokenizer, pairs: list[ContrastPair], *, chat: bool = False) -> list[Sequence]:
    """Sequences ordered [p0, n0, p1, n1, ...]."""
    out = []
    for i, pair in enumerate(pairs):
        head = None if pair.prompt is None else list(prompt_ids(tokenizer, pair.prompt, chat))
        for side in SIDES:
            text = getattr(pair, side)
            if head is None:
                ids = list(prompt_ids(tokenizer, text, chat))
                out.append(Sequence(ids, len(ids), i, side))
            else:
                tail = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
                out.append(Sequence(head + tail, len(head), i, side))
    return out


def check_read(read, pairs: list[ContrastPair]):
    """The read position as a mode name or a `Positions`; a mode that needs completions is refused without them."""
    if isinstance(read, str) and read in READ_MODES:
        if read != "last":
            missing = next((i for i, p in enumerate(pairs) if p.prompt is None), None)
            if missing is not None:
                raise DataError(f"pair {missing}: read={read!r} reads completion tokens, but the pair has no prompt; "
                                "give prompts with two completions, or read='last'")
        return read
    try:
        return Positions.parse(read)
    except PositionError as e:
        raise DataError(f"cannot read at {read!r}: expected one of {READ_MODES} or a Positions selector ({e})") from None


def read_description(read) -> str:
    return read if isinstance(read, str) else repr(read)


def padded_batch(seqs: list[Sequence], read, pad_id: int, padding_side: str = "right") -> tuple[dict, torch.Tensor]:
    """-> (`{"input_ids", "attention_mask"}`, read mask [B, T] of the tokens to read, absolute positions)."""
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B, T = len(seqs), max(len(s.ids) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    offset = []
    for b, s in enumerate(seqs):
        o = T - len(s.ids) if padding_side == "left" else 0
        offset.append(o)
        if s.ids:
            input_ids[b, o:o + len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            mask[b, o:o + len(s.ids)] = 1
    read_mask = torch.zeros(B, T, dtype=torch.bool)
    if isinstance(read, Positions):
        loc = read.resolve(mask.bool())
        rows = torch.arange(B)[:, None].expand_as(loc.index)
        read_mask[rows[loc.valid], loc.index[loc.valid]] = True
        read_mask &= mask.bool()
    else:
        for b, s in enumerate(seqs):
            n = len(s.ids)
            if read == "last":
                span = range(n - 1, n) if n else range(0)
            elif read == "answer":
                span = range(s.start, s.start + 1) if n > s.start else range(0)
            else:  # completion_mean
                span = range(s.start, n)
            for t in span:
                read_mask[b, offset[b] + t] = True
    empty = (~read_mask.any(1)).nonzero().flatten().tolist()
    if empty:
        s = seqs[empty[0]]
        raise DataError(f"pair {s.pair}: the {s.side} side has no token at read position "
                        f"{read_description(read)!r} ({len(s.ids)} tokens, completion starts at {s.start}); "
                        "fix or drop that pair")
    return {"input_ids": input_ids, "attention_mask": mask}, read_mask
