"""Prompts in, replies out: the chat template, left-padded batches and greedy decoding, shared by the CLI,
the demo and the benchmarks. Works with a plain model or a `ReftModel` (pass `adapter_names` to mix adapters
per example)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of one prompt, through the chat template (with the assistant turn opened) when there is one."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def left_padded(tokenizer, prompts: list[str], chat: bool = True, device=None) -> dict:
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    T = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), T), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):] = torch.tensor(x)
        mask[i, T - len(x):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def generate_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, chat: bool = True,
                     **generate_kwargs) -> list[str]:
    """Greedy replies for a batch of prompts."""
    if not prompts:
        raise ConfigError("no prompts given")
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise ConfigError(f"{type(model).__name__} cannot generate text; pass a causal language model "
                          "(for example smollm2-135m-instruct or tiny-llama)")
    device = next(model.parameters()).device
    batch = left_padded(tokenizer, prompts, chat, device)
    pad = batch["input_ids"][0, 0].item() if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             **generate_kwargs)
    T = batch["input_ids"].shape[1]
    return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]
