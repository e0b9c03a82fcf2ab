"""On the built-in SmolLM2-135M-Instruct: a LoReFT adapter learns the caps data within a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from reftkit.reft.config import ReftConfig
from reftkit.reft.data import Collator, encode, read_rows
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, evaluate, train

CAPS = Path(__file__).resolve().parents[2] / "examples" / "data" / "caps_train.jsonl"


@pytest.mark.real_model
def test_loreft_on_smollm2_lowers_the_caps_loss(smollm2):
    model, tok = smollm2
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    data = encode(tok, read_rows(CAPS)[:8], "sft", chat=False, max_length=64)  # short prompts: a fast test
    args = TrainArgs(max_steps=4, batch_size=8, lr=4e-3, progress=False)
    collator = Collator(tok.pad_token_id, "sft")
    reft = ReftModel(model, ReftConfig(method="loreft", layers=[20, 25], rank=4, positions="f1+l1"))
    try:
        before = evaluate(reft, data, collator, args, "sft")
        result = train(reft, data, args, pad_token_id=tok.pad_token_id)
        after = evaluate(reft, data, collator, args, "sft")
    finally:
        reft.unload()
        for name, p in model.named_parameters():  # the session model is shared: leave it as it was
            p.requires_grad_(grads[name])
    assert result["step"] == 4
    assert after < 0.8 * before, (before, after)
