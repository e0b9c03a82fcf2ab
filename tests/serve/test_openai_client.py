"""The official `openai` client (sync and async) against a running server: models, chat and completions,
streamed and not, `extra_body`, usage and finish reasons, and every error status mapped to the client's
exception class."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .util import BASE, async_client, client, make_app, running

MSG = [{"role": "user", "content": "Say something."}]
GREEDY = dict(temperature=0, max_tokens=8)
STEER = {"reftkit": {"steer": [{"name": "happy", "coefficient": 2.0}]}}


def test_models_lists_the_base_and_its_adapters(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {BASE, "caps", "pirate", "brief"}
    assert models[BASE].parent is None
    assert all(models[a].parent == BASE for a in ("caps", "pirate", "brief"))
    assert client(server).models.retrieve("caps").parent == BASE


def test_chat_and_completions(server):
    c = client(server)
    base = c.chat.completions.create(model=BASE, messages=MSG, **GREEDY)
    adapted = c.chat.completions.create(model="caps", messages=MSG, **GREEDY)
    steered = c.chat.completions.create(model=BASE, messages=MSG, extra_body=STEER, **GREEDY)
    for r in (base, adapted, steered):
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert adapted.model == "caps"
    texts = {r.choices[0].message.content for r in (base, adapted, steered)}
    assert len(texts) == 3, "the adapter and the vector change the reply"
    again = c.chat.completions.create(model=BASE, messages=MSG, **GREEDY)
    assert again.choices[0].message.content == base.choices[0].message.content  # greedy is deterministic
    done = c.completions.create(model="pirate", prompt="Once upon a time", **GREEDY)
    assert done.object == "text_completion" and done.choices[0].text is not None
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8


def test_streams_match_the_non_streamed_reply(server):
    c = client(server)
    whole = c.chat.completions.create(model="caps", messages=MSG, **GREEDY)
    chunks = list(c.chat.completions.create(model="caps", messages=MSG, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    plain = list(c.completions.create(model=BASE, prompt="Once", stream=True, extra_body=STEER, **GREEDY))
    assert all(ch.usage is None for ch in plain)  # without include_usage there is no usage chunk
    assert "".join(ch.choices[0].text for ch in plain) == \
        c.completions.create(model=BASE, prompt="Once", extra_body=STEER, **GREEDY).choices[0].text


def test_n_seed_and_stop(server):
    c = client(server)
    sampled = dict(model=BASE, messages=MSG, max_tokens=8, temperature=1.0, seed=3, n=3)
    r = c.chat.completions.create(**sampled)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert c.chat.completions.create(**sampled).choices[1].message.content == r.choices[1].message.content
    assert 3 <= r.usage.completion_tokens <= 24  # summed over the choices; the prompt is counted once
    text = c.completions.create(model=BASE, prompt="abc", max_tokens=10, temperature=0).choices[0].text
    stop = text[2:4]
    cut = c.completions.create(model=BASE, prompt="abc", max_tokens=10, temperature=0, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.index(stop)], "stop")


def test_async_client_streams_and_batches(server):
    async def main():
        c = async_client(server)
        one = await c.chat.completions.create(model="brief", messages=MSG, **GREEDY)
        stream = await c.chat.completions.create(model="brief", messages=MSG, stream=True, **GREEDY)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        several = await asyncio.gather(*[c.completions.create(model=m, prompt="Hello", **GREEDY)
                                         for m in (BASE, "caps", "pirate", "brief")])
        await c.close()
        return one, text, several

    one, text, several = asyncio.run(main())
    assert text == one.choices[0].message.content
    assert len({r.choices[0].text for r in several}) == 4


def test_error_statuses_map_to_the_client_exceptions(assets):
    app = make_app(assets, api_keys=["the-right-key"], max_body_bytes=2048)
    with running(app) as url:
        good = client(url, api_key="the-right-key")
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, api_key="the-wrong-key").models.list()
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.NotFoundError) as e:
            good.chat.completions.create(model="missing", messages=MSG)
        assert (e.value.code, e.value.param) == ("model_not_found", "model")
        with pytest.raises(openai.BadRequestError) as e:
            good.chat.completions.create(model=BASE, messages=MSG, max_tokens=-3)
        assert (e.value.code, e.value.param) == ("integer_below_min_value", "max_tokens")
        with pytest.raises(openai.BadRequestError) as e:
            good.chat.completions.create(model=BASE, messages=MSG,
                                         extra_body={"reftkit": {"steer": [{"name": "nope", "coefficient": 1}]}})
        assert e.value.param == "reftkit.steer[0].name"
        with pytest.raises(openai.APIStatusError) as e:
            good.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x" * 4000}])
        assert e.value.status_code == 413 and e.value.code == "request_too_large"
        with pytest.raises(openai.PermissionDeniedError):
            good.post("/adapters", body={"name": "x", "path": "y"}, cast_to=object)
        app.state.reftkit.batcher.accepting = False  # as during shutdown
        with pytest.raises(openai.InternalServerError) as e:
            good.chat.completions.create(model=BASE, messages=MSG)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"

        async def streamed():
            c = async_client(url, api_key="the-right-key")
            try:
                await c.chat.completions.create(model="missing", messages=MSG, stream=True)
            finally:
                await c.close()

        with pytest.raises(openai.NotFoundError):
            asyncio.run(streamed())
