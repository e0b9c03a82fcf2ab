"""The server on the built-in SmolLM2 with a LoReFT adapter: a base request and an adapter request sent together
run in one batch and get exactly their replies alone, and streamed text (a real BPE tokenizer, detokenised
incrementally) equals the non-streamed reply."""

from __future__ import annotations

import asyncio

import pytest
import torch

from reftkit.models import load_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel

from .util import async_client, client, metric, running

pytestmark = [pytest.mark.real_model, pytest.mark.numerics]
BASE = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": "Name three fruits and say one thing about each."}]


def test_base_and_adapter_in_one_batch_on_smollm2(tmp_path):
    from reftkit.serve.app import build_app
    from reftkit.serve.config import ServerConfig

    model, tok = load_model(BASE)
    reft = ReftModel(model, ReftConfig(layers=[8, 16, 24], rank=4, positions="f1+l1", seed=3), "caps")
    with torch.no_grad():  # a stronger edit than a fresh adapter's, so its reply differs
        for iv in reft.adapters["caps"]:
            for name, p in iv.named_parameters():
                if "learned_source" in name:
                    p.mul_(8.0)
    reft.save_pretrained(tmp_path / "caps")
    reft.unload()
    app = build_app(model, tok, ServerConfig(model_name=BASE, max_wait_ms=300), adapters={"caps": tmp_path / "caps"})
    with running(app) as url:
        ask = dict(messages=MSG, max_tokens=24, temperature=0)

        async def together():
            c = async_client(url)
            try:
                return await asyncio.gather(*[c.chat.completions.create(model=m, **ask) for m in (BASE, "caps")])
            finally:
                await c.close()

        batches = metric(url, "reftkit_batches_total")
        both = [r.choices[0].message.content for r in asyncio.run(together())]
        assert metric(url, "reftkit_batches_total") == batches + 1
        c = client(url)
        alone = [c.chat.completions.create(model=m, **ask).choices[0].message.content for m in (BASE, "caps")]
        assert both == alone
        assert both[0] != both[1]
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="caps", stream=True, **ask) if ch.choices)
        assert streamed == alone[1]
