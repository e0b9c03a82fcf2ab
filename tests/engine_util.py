"""Helpers shared by the engine, sites, positions and io tests (not a test module)."""

from __future__ import annotations

import torch

FAMILIES = ["llama", "gpt2", "gpt-neox", "qwen2", "qwen3", "gemma2", "mistral", "bert", "roberta", "qwen3-moe",
            "olmoe"]
ENCODERS = {"bert", "roberta"}


def token_ids(batch: int = 2, seq: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 260, (batch, seq), generator=torch.Generator().manual_seed(seed))


def main_output(out) -> torch.Tensor:
    """Logits of a causal LM, the last hidden state of an encoder."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


@torch.no_grad()
def plain(model, **inputs) -> torch.Tensor:
    return main_output(model(**inputs))


@torch.no_grad()
def intervened(im, **kwargs) -> torch.Tensor:
    return main_output(im(**kwargs))


def left_pad(rows: list[torch.Tensor], pad: int = 0):
    """Left-padded batch + mask from 1-D token rows."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def right_pad(rows: list[torch.Tensor], pad: int = 0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as generation computes them."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


