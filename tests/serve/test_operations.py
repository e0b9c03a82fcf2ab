"""Operations on a running server: overload is shed with fast 503s and the queue drains; health and Prometheus
metrics; graceful shutdown lets in-flight requests finish; runtime adapter loads and unloads under load, never
pulling an adapter from under a request and never reading outside the allow-listed folder."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time

import httpx
import pytest

from reftkit.serve.app import PLAYGROUND
from reftkit.serve.registry import REGISTRY_FILE

from .util import BASE, async_client, client, make_app, metric, running, slow_down

MSG = [{"role": "user", "content": "Hello"}]


def test_overload_is_shed_fast_and_the_queue_drains(assets):
    app = make_app(assets, max_batch_size=2, max_queue=2, max_wait_ms=5)
    slow_down(app, 0.01)
    with running(app) as url:
        async def one(h):
            start = time.monotonic()
            r = await h.post(url + "/v1/chat/completions", json={"model": BASE, "messages": MSG, "max_tokens": 20,
                                                                 "temperature": 0})
            return r, time.monotonic() - start

        async def burst():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as h:
                return await asyncio.gather(*[one(h) for _ in range(16)])

        results = asyncio.run(burst())
        statuses = sorted(r.status_code for r, _ in results)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2
        shed = [(r, t) for r, t in results if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r, _ in shed)
        ok_times = sorted(t for r, t in results if r.status_code == 200)
        assert max(t for _, t in shed) < ok_times[-1]  # refused at admission, without waiting for the engine
        deadline = time.monotonic() + 5
        while metric(url, "reftkit_queue_depth") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "reftkit_queue_depth") == 0
        assert httpx.get(url + "/health").json() == {"status": "ok", "queue_depth": 0}


def test_metrics_are_prometheus_text_and_requests_are_logged(server, caplog):
    with caplog.at_level("INFO", logger="reftkit.serve.app.access"):
        client(server).chat.completions.create(model="caps", messages=MSG, max_tokens=4, temperature=0)
    entry = json.loads(caplog.records[-1].getMessage())
    assert (entry["model"], entry["completion_tokens"], entry["finish_reasons"]) == ("caps", 4, ["length"])
    assert entry["e2e_s"] >= entry["ttft_s"] > 0
    r = httpx.get(server + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    for name, kind in (("reftkit_requests_total", "counter"), ("reftkit_queue_depth", "gauge"),
                       ("reftkit_output_tokens_per_second", "gauge"),
                       ("reftkit_time_to_first_token_seconds", "histogram"),
                       ("reftkit_e2e_latency_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in lines
    assert any(line.startswith('reftkit_requests_total{endpoint="/v1/chat/completions",status="200"} ')
               for line in lines)
    assert metric(server, "reftkit_generated_tokens_total") >= 4
    assert metric(server, "reftkit_e2e_latency_seconds_count") >= 1
    for line in lines:  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_playground_route(server):
    r = httpx.get(server + "/playground")
    if PLAYGROUND.is_file():
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    else:
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_graceful_shutdown_finishes_in_flight_requests(assets):
    import uvicorn

    from .util import free_port

    app = make_app(assets, max_wait_ms=5, shutdown_grace_s=10)
    slow_down(app, 0.02)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    result = {}

    def call():
        r = client(f"http://127.0.0.1:{port}").chat.completions.create(model="caps", messages=MSG, max_tokens=30,
                                                                       temperature=0)
        result["reply"] = r

    caller = threading.Thread(target=call)
    caller.start()
    while metric(f"http://127.0.0.1:{port}", "reftkit_running_rows") == 0:
        time.sleep(0.01)
    server.should_exit = True  # what SIGTERM / Ctrl-C do
    caller.join(30)
    thread.join(30)
    assert result["reply"].choices[0].finish_reason == "length"
    assert result["reply"].usage.completion_tokens == 30
    assert not app.state.reftkit.batcher.thread.is_alive()


@pytest.fixture
def adapter_root(assets, tmp_path):
    root = tmp_path / "allowed"
    for name in ("caps", "pirate", "brief"):
        shutil.copytree(assets["adapters"][name], root / name)
    os.symlink(assets["vectors"]["happy"], root / "escape")  # a link out of the folder
    return root


def test_runtime_adapter_load_and_unload_under_load(assets, adapter_root, server):
    expected = client(server).chat.completions.create(model="pirate", messages=MSG, max_tokens=12, temperature=0)
    app = make_app(assets, adapters=False, adapter_dir=str(adapter_root), allow_adapter_updates=True,
                   max_wait_ms=5)
    slow_down(app, 0.01)
    with running(app) as url:
        h = httpx.Client(base_url=url, timeout=60)
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [BASE]
        stop = threading.Event()
        background = []

        def load():  # base traffic all along
            while not stop.is_set():
                r = h.post("/v1/chat/completions", json={"model": BASE, "messages": MSG, "max_tokens": 6,
                                                         "temperature": 0})
                background.append(r.status_code)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            r = h.post("/v1/adapters", json={"name": "pirate", "path": "pirate"})
            assert r.status_code == 201 and r.json()["parent"] == BASE
            got = client(url).chat.completions.create(model="pirate", messages=MSG, max_tokens=12, temperature=0)
            assert got.choices[0].message.content == expected.choices[0].message.content
            assert json.loads((adapter_root / REGISTRY_FILE).read_text())["adapters"] == {"pirate": "pirate"}

            # an adapter in use cannot be pulled from under its request
            done = {}
            slow = threading.Thread(target=lambda: done.setdefault("r", client(url).chat.completions.create(
                model="pirate", messages=MSG, max_tokens=60, temperature=0)))
            slow.start()
            deadline = time.monotonic() + 10
            while not h.get("/v1/adapters").json()["data"][0]["in_use"] and time.monotonic() < deadline:
                time.sleep(0.005)
            busy = h.delete("/v1/adapters/pirate")
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_busy"
            slow.join(30)
            assert done["r"].usage.completion_tokens == 60
            assert h.delete("/v1/adapters/pirate").status_code == 200
            gone = h.post("/v1/chat/completions", json={"model": "pirate", "messages": MSG})
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
            assert json.loads((adapter_root / REGISTRY_FILE).read_text())["adapters"] == {}
        finally:
            stop.set()
            worker.join(30)
        assert background and set(background) == {200}

        for path, code in (("../../etc", "path_not_allowed"), ("/etc", "path_not_allowed"),
                           ("escape", "path_not_allowed"), ("caps/../..", "path_not_allowed"),
                           ("missing", "invalid_adapter")):
            r = h.post("/v1/adapters", json={"name": "x", "path": path})
            assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, code, "path"), path
        assert str(adapter_root) not in h.post("/v1/adapters", json={"name": "x", "path": "missing"}).text
        assert h.post("/v1/adapters", json={"name": "../x", "path": "caps"}).status_code == 400
        assert h.post("/v1/adapters", json={"name": BASE, "path": "caps"}).status_code == 409
        assert h.post("/v1/adapters", json={"name": "caps", "path": "caps", "x": 1}).status_code == 400


def test_async_requests_during_an_update(assets, adapter_root):
    app = make_app(assets, adapters=False, adapter_dir=str(adapter_root), allow_adapter_updates=True)
    with running(app) as url:
        async def main():
            c = async_client(url)
            async with httpx.AsyncClient(base_url=url) as h:
                loaded, *replies = await asyncio.gather(
                    h.post("/v1/adapters", json={"name": "brief", "path": "brief"}),
                    *[c.completions.create(model=BASE, prompt=f"p{i}", max_tokens=5, temperature=0)
                      for i in range(6)])
            await c.close()
            return loaded, replies

        loaded, replies = asyncio.run(main())
        assert loaded.status_code == 201 and len(replies) == 6


def test_request_timeout_cancels_the_request(assets):
    app = make_app(assets, max_wait_ms=5, request_timeout_s=0.3)
    slow_down(app, 0.05)
    with running(app) as url:
        body = {"model": BASE, "messages": MSG, "max_tokens": 60, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10
        while metric(url, "reftkit_running_rows") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "reftkit_running_rows") == 0  # the timed-out rows were dropped, not run to the end
