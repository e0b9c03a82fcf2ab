"""Batching through the server: concurrent requests for different adapters and steering settings run in one
batch and get exactly the replies they get alone; coefficient 0 is the base model; the distinct-settings cap
splits batches without changing replies; half the streams of a batch disconnecting leaves the other half
token-identical to an undisturbed run, and the disconnected rows stop."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from .util import BASE, async_client, make_app, metric, running, slow_down

pytestmark = pytest.mark.numerics

SPECS = [(BASE, None), ("caps", None), ("pirate", None), (BASE, 2.0), ("brief", -1.5), (BASE, 0.0), ("caps", 0.0),
         ("pirate", 1.0)]


def request(i, model, coefficient, max_tokens=10):
    extra = {} if coefficient is None else {"reftkit": {"steer": [{"name": "happy", "coefficient": coefficient}]}}
    return dict(model=model, messages=[{"role": "user", "content": f"Question number {i}?"}], temperature=0,
                max_tokens=max_tokens, extra_body=extra)


async def replies(url, requests):
    c = async_client(url)
    try:
        out = await asyncio.gather(*[c.chat.completions.create(**r) for r in requests])
    finally:
        await c.close()
    return [r.choices[0].message.content for r in out]


def test_a_mixed_batch_equals_each_request_alone(assets):
    app = make_app(assets, max_batch_size=8, max_wait_ms=200)
    with running(app) as url:
        before = metric(url, "reftkit_batches_total")
        mixed = asyncio.run(replies(url, [request(i, m, c) for i, (m, c) in enumerate(SPECS)]))
        assert metric(url, "reftkit_batches_total") == before + 1  # one batch held all eight
        alone = [asyncio.run(replies(url, [request(i, m, c)]))[0] for i, (m, c) in enumerate(SPECS)]
        assert mixed == alone
        base = asyncio.run(replies(url, [request(i, BASE, None) for i in range(len(SPECS))]))
        assert mixed[5] == base[5]  # coefficient 0: the base model
        assert all(mixed[i] != base[i] for i in (1, 2, 3, 4, 7))


def test_the_distinct_settings_cap_splits_batches_not_replies(assets):
    app = make_app(assets, max_batch_size=8, max_wait_ms=200, max_distinct=2)
    with running(app) as url:
        specs = [(BASE, None), ("caps", None), ("pirate", None), ("brief", None), ("caps", None)]
        before = metric(url, "reftkit_batches_total")
        capped = asyncio.run(replies(url, [request(i, m, c) for i, (m, c) in enumerate(specs)]))
        assert metric(url, "reftkit_batches_total") - before >= 2  # 4 distinct settings cannot share one batch
        alone = [asyncio.run(replies(url, [request(i, m, c)]))[0] for i, (m, c) in enumerate(specs)]
        assert capped == alone


async def stream(url, body, disconnect_after=None):
    """Stream one chat request over raw HTTP -> the concatenated content (up to the disconnect)."""
    text, seen = "", 0
    async with httpx.AsyncClient(timeout=60) as h:
        async with h.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                    seen += 1
                if disconnect_after is not None and seen >= disconnect_after:
                    return text  # leaving the blocks closes the connection mid-stream
    return text


def body(i, model):
    return {"model": model, "messages": [{"role": "user", "content": f"Stream {i}"}], "temperature": 0,
            "max_tokens": 40}


def test_disconnecting_half_the_streams_leaves_the_rest_identical(assets):
    app = make_app(assets, max_batch_size=8, max_wait_ms=400)
    slow_down(app, 0.02)
    models = [BASE, "caps", "pirate", "brief"] * 2
    with running(app) as url:
        async def run(disconnect: bool):
            return await asyncio.gather(*[stream(url, body(i, m), 3 if disconnect and i % 2 else None)
                                          for i, m in enumerate(models)])

        tokens = metric(url, "reftkit_generated_tokens_total")
        undisturbed = asyncio.run(run(False))
        full = metric(url, "reftkit_generated_tokens_total") - tokens
        batches = metric(url, "reftkit_batches_total")
        disturbed = asyncio.run(run(True))
        assert metric(url, "reftkit_batches_total") == batches + 1
        assert [disturbed[i] for i in range(0, 8, 2)] == [undisturbed[i] for i in range(0, 8, 2)]
        for i in range(1, 8, 2):
            assert undisturbed[i].startswith(disturbed[i])
        # the disconnected rows were dropped at a step soon after: far fewer tokens than the full run
        partial = metric(url, "reftkit_generated_tokens_total") - tokens - full
        assert partial < full * 0.5 + 4 * 20
        assert metric(url, "reftkit_running_rows") == 0
