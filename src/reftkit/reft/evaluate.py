"""Evaluating a model or adapter on a data file: mean loss for every task, plus accuracy for classification
and the preference accuracy (chosen scored above rejected) for DPO data; and, with a behaviour check
(`reftkit.behaviours`), the success rate of greedy replies to the file's prompts (`evaluate_generations`), which
needs only a `prompt` per row (plus `answer` for the `answer` check).

The base model and an adapter go through the same `ReftModel` path (without an adapter it calls the base model
directly), so their numbers are comparable: the loss is averaged over the same items as in training (label
tokens, examples, or pairs)."""

from __future__ import annotations

import math

import torch

from ..behaviours import Behaviour, behaviour as make_behaviour
from ..errors import DataError
from .data import Collator, encode, read_rows
from .model import ReftModel
from .train import batch_items, sequence_logprobs


def evaluate_file(model, tokenizer, path, *, task: str = "sft", adapter: str | None = None, batch_size: int = 8,
                  max_length: int = 512, chat: bool = True, label_names: list[str] | None = None,
                  dpo_beta: float = 0.1) -> dict:
    data = encode(tokenizer, read_rows(path), task, chat=chat, max_length=max_length, label_names=label_names,
                  where=str(path))
    reft = ReftModel.from_pretrained(model, adapter) if adapter else ReftModel(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = Collator(pad, task, device=next(model.parameters()).device)
    reft.eval()
    loss_sum, items, n, correct = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for s in range(0, len(data), batch_size):
                chunk = data[s: s + batch_size]
                batch = collator(chunk)
                if task == "dpo":
                    B = len(chunk)
                    policy = sequence_logprobs(reft, batch)
                    with reft.disable_adapter():
                        ref = policy if not adapter else sequence_logprobs(reft, batch)
                    margin = (policy[:B] - ref[:B]) - (policy[B:] - ref[B:])
                    correct += int((policy[:B] > policy[B:]).sum())
                    loss_sum += float(-torch.nn.functional.logsigmoid(dpo_beta * margin).sum())
                else:
                    out = reft(**batch, num_items_in_batch=1)
                    loss_sum += float(out.loss)
                    if task == "classification":
                        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                items += batch_items(batch, task)
                n += len(chunk)
    finally:
        reft.unload()
    result = {"examples": n, "loss": loss_sum / max(items, 1)}
    if task == "sft":
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if task in ("classification", "dpo"):
        result["accuracy"] = correct / n
    return result


def evaluate_generations(model, tokenizer, path, check: "str | Behaviour", *, adapter: str | None = None,
                         max_new_tokens: int = 64, batch_size: int = 8, chat: bool = True) -> dict:
    """Greedy replies to every row's `prompt`, scored by the behaviour `check`. Returns the success rate, the
    counts and every reply with its verdict: {"behaviour", "examples", "successes", "success_rate", "replies"}."""
    from ..chat import generate_replies

    check = make_behaviour(check)
    rows = read_rows(path)
    where = str(path)
    prompts = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: row {i} has no 'prompt' (a non-empty string) to generate a reply to")
        prompts.append(prompt)
    check.validate_rows(rows, where)  # before any generation
    target = ReftModel.from_pretrained(model, adapter) if adapter else model
    replies: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            replies += generate_replies(target, tokenizer, prompts[s: s + batch_size], max_new_tokens=max_new_tokens,
                                        chat=chat)
    finally:
        if adapter:
            target.unload()
    verdicts = [check.check(reply, row, i) for i, (reply, row) in enumerate(zip(replies, rows))]
    return {"behaviour": check.spec, "examples": len(rows), "successes": sum(verdicts),
            "success_rate": sum(verdicts) / len(rows),
            "replies": [{"prompt": p, "reply": r, "ok": ok} for p, r, ok in zip(prompts, replies, verdicts)]}
