"""Bad requests against a running server: each gets its exact status and OpenAI error object (`type`, `code`,
`param`), before anything reaches the engine."""

from __future__ import annotations

import json

import httpx
import pytest

from .util import BASE, make_app, running

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(assets):
    app = make_app(assets, api_keys=[KEY], max_body_bytes=4096, max_prompt_tokens=64, max_new_tokens=32, max_n=4)
    with running(app) as u:
        yield u


def chat(**fields):
    return {"model": BASE, "messages": MSG, **fields}


def steer(item):
    return chat(reftkit={"steer": [item]})


I = "invalid_request_error"
CASES = [  # (id, path, body: dict | bytes, status, type, code, param)
    ("malformed json", "chat", b'{"model": ', 400, I, "invalid_json", None),
    ("not utf-8", "chat", b'\xff\xfe{}', 400, I, "invalid_json", None),
    ("body not an object", "chat", b"[1, 2]", 400, I, "invalid_type", None),
    ("missing model", "chat", {"messages": MSG}, 400, I, "missing_required_parameter", "model"),
    ("model not a string", "chat", chat(model=3), 400, I, "invalid_type", "model"),
    ("unknown model", "chat", chat(model="no-such-adapter"), 404, I, "model_not_found", "model"),
    ("missing messages", "chat", {"model": BASE}, 400, I, "missing_required_parameter", "messages"),
    ("empty messages", "chat", chat(messages=[]), 400, I, "empty_array", "messages"),
    ("bad role", "chat", chat(messages=[{"role": "robot", "content": "x"}]), 400, I, "invalid_value",
     "messages[0].role"),
    ("content not text", "chat", chat(messages=[{"role": "user", "content": 5}]), 400, I, "invalid_type",
     "messages[0].content"),
    ("negative max_tokens", "chat", chat(max_tokens=-1), 400, I, "integer_below_min_value", "max_tokens"),
    ("zero max_tokens", "completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, I,
     "integer_below_min_value", "max_tokens"),
    ("huge max_tokens", "chat", chat(max_tokens=10 ** 9), 400, I, "context_length_exceeded", "max_tokens"),
    ("max_tokens a string", "chat", chat(max_tokens="5"), 400, I, "invalid_type", "max_tokens"),
    ("max_tokens a bool", "chat", chat(max_tokens=True), 400, I, "invalid_type", "max_tokens"),
    ("max_completion_tokens too large", "chat", chat(max_completion_tokens=33), 400, I, "context_length_exceeded",
     "max_completion_tokens"),
    ("temperature too high", "chat", chat(temperature=2.5), 400, I, "decimal_above_max_value", "temperature"),
    ("temperature NaN", "chat", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
                                b'"temperature": NaN}', 400, I, "invalid_type", "temperature"),
    ("top_p zero", "chat", chat(top_p=0), 400, I, "decimal_below_min_value", "top_p"),
    ("n zero", "chat", chat(n=0), 400, I, "integer_below_min_value", "n"),
    ("n above the limit", "chat", chat(n=5), 400, I, "integer_above_max_value", "n"),
    ("seed a float", "chat", chat(seed=1.5), 400, I, "invalid_type", "seed"),
    ("too many stops", "chat", chat(stop=["a", "b", "c", "d", "e"]), 400, I, "array_above_max_length", "stop"),
    ("empty stop", "chat", chat(stop=[""]), 400, I, "invalid_value", "stop"),
    ("stream not a bool", "chat", chat(stream="yes"), 400, I, "invalid_type", "stream"),
    ("stream_options without stream", "chat", chat(stream_options={"include_usage": True}), 400, I,
     "invalid_value", "stream_options"),
    ("unknown parameter", "chat", chat(frobnicate=1), 400, I, "unknown_parameter", "frobnicate"),
    ("tools", "chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, I,
     "unsupported_parameter", "tools"),
    ("logprobs", "chat", chat(logprobs=True), 400, I, "unsupported_parameter", "logprobs"),
    ("penalty", "completions", {"model": BASE, "prompt": "x", "presence_penalty": 1.0}, 400, I,
     "unsupported_parameter", "presence_penalty"),
    ("unknown steering vector", "chat", steer({"name": "sad", "coefficient": 1}), 400, I,
     "steering_vector_not_found", "reftkit.steer[0].name"),
    ("coefficient not a number", "chat", steer({"name": "happy", "coefficient": "big"}), 400, I, "invalid_type",
     "reftkit.steer[0].coefficient"),
    ("coefficient too large", "chat", steer({"name": "happy", "coefficient": 1e9}), 400, I,
     "decimal_above_max_value", "reftkit.steer[0].coefficient"),
    ("steering entry unknown key", "chat", steer({"name": "happy", "layer": 3}), 400, I, "unknown_parameter",
     "reftkit.steer[0].layer"),
    ("extension not an object", "chat", chat(reftkit=[1]), 400, I, "invalid_type", "reftkit"),
    ("extension unknown key", "chat", chat(reftkit={"vectors": []}), 400, I, "unknown_parameter",
     "reftkit.vectors"),
    ("too many vectors", "chat", chat(reftkit={"steer": [{"name": "happy"}] * 5}), 400, I,
     "array_above_max_length", "reftkit.steer"),
    ("prompt too long", "chat", chat(messages=[{"role": "user", "content": "word " * 40}]), 400, I,
     "context_length_exceeded", "messages"),
    ("missing prompt", "completions", {"model": BASE}, 400, I, "missing_required_parameter", "prompt"),
    ("several prompts", "completions", {"model": BASE, "prompt": ["a", "b"]}, 400, I, "unsupported_parameter",
     "prompt"),
    ("token-id prompt", "completions", {"model": BASE, "prompt": 17}, 400, I, "invalid_type", "prompt"),
    ("messages on completions", "completions", {"model": BASE, "prompt": "x", "messages": MSG}, 400, I,
     "unknown_parameter", "messages"),
    ("oversized body", "chat", chat(messages=[{"role": "user", "content": "x" * 5000}]), 413, I,
     "request_too_large", None),
]


def check(response, status, type_, code, param):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("name,path,body,status,type_,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(url, name, path, body, status, type_, code, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    check(r, status, type_, code, param)


def test_body_without_content_length_is_cut_at_the_limit(url):
    def chunks():
        for _ in range(100):
            yield b" " * 1000

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers=AUTH)
    check(r, 413, I, "request_too_large", None)


@pytest.mark.parametrize("headers,code", [({}, "missing_api_key"), ({"Authorization": "Bearer wrong-key-000"},
                                                                     "invalid_api_key"),
                                          ({"Authorization": f"Basic {KEY}"}, "invalid_api_key")])
def test_api_key_required(url, headers, code):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("GET", "/v1/nothing-here")):
        r = httpx.request(method, url + path, json=chat(), headers=headers)
        check(r, 401, "authentication_error", code, None)
    assert httpx.get(url + "/health").status_code == 200  # open


def test_unknown_route_and_method(url):
    check(httpx.get(url + "/v1/nothing-here", headers=AUTH), 404, I, "not_found", None)
    check(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405, I, "method_not_allowed", None)
    check(httpx.get(url + "/v1/models/no-such-model", headers=AUTH), 404, I, "model_not_found", "model")


def test_runtime_updates_are_off_by_default(url):
    r = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "caps"}, headers=AUTH)
    check(r, 403, "permission_error", "updates_disabled", None)
    check(httpx.delete(url + "/v1/adapters/caps", headers=AUTH), 403, "permission_error", "updates_disabled", None)


def test_nothing_bad_reached_the_engine(url):
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert "reftkit_batches_total 0" in text
