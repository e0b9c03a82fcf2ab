"""Evaluating a model or adapter on a data file: mean loss for every task, plus accuracy for classification
and the preference accuracy (chosen scored above rejected) for DPO data."""

from __future__ import annotations

import math

import torch

from .data import Collator, encode, read_rows
from .model import ReftModel
from .train import sequence_logprobs


def evaluate_file(model, tokenizer, path, *, task: str = "sft", adapter: str | None = None, batch_size: int = 8,
                  max_length: int = 512, chat: bool = True) -> dict:
    data = encode(tokenizer, read_rows(path), task, chat=chat, max_length=max_length, where=str(path))
    reft = ReftModel.from_pretrained(model, adapter) if adapter else ReftModel(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = Collator(pad, task)
    reft.eval()
    loss_sum, n, correct = 0.0, 0, 0
    try:
        with torch.no_grad():
            for s in range(0, len(data), batch_size):
                chunk = data[s: s + batch_size]
                batch = collator(chunk)
                if task == "dpo":
                    lp = sequence_logprobs(reft, batch) if adapter else _plain_logprobs(reft, batch)
                    B = len(chunk)
                    correct += int((lp[:B] > lp[B:]).sum())
                    loss_sum += float(-(lp[:B]).sum())
                else:
                    out = reft(**batch) if adapter else reft.model(**{k: v for k, v in batch.items() if k != "prompt_mask"})
                    loss_sum += float(out.loss) * len(chunk)
                    if task == "classification":
                        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                n += len(chunk)
    finally:
        reft.unload()
    result = {"examples": n, "loss": loss_sum / n}
    if task == "sft":
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if task in ("classification", "dpo"):
        result["accuracy"] = correct / n
    return result


def _plain_logprobs(reft: ReftModel, batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    logits = reft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    return (lp * (labels[:, 1:] != -100)).sum(1)
