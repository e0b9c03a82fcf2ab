"""Helpers of the serving tests: adapter and vector folders, a uvicorn server in a thread on a
free loopback port, and clients (the official `openai` client, and raw httpx for malformed requests)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from reftkit.models import build_tiny_model, build_tiny_tokenizer
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel
from reftkit.steer import SteeringVector

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

BASE = "tiny-llama"
ADAPTERS = {"caps": (1, 11), "pirate": (2, 12), "brief": (3, 13)}  # name -> (layer, seed)


def model_and_tokenizer():
    # initializer_range 0.2: sharper logits than the default 0.02, so adapters and vectors change the tokens
    return build_tiny_model("llama", initializer_range=0.2), build_tiny_tokenizer()


def assets_in(root):
    """Adapter and vector folders under `root` -> {"adapters": {name: folder}, "vectors": {name: folder}, "root":
    the folder that holds the adapters}."""
    model, _ = model_and_tokenizer()
    adapters = {}
    for name, (layer, seed) in ADAPTERS.items():
        reft = ReftModel(model, ReftConfig(layers=[layer], rank=4, seed=seed, positions="f1+l1"), name)
        with torch.no_grad():
            for iv in reft.adapters[name]:  # a larger edit than a fresh adapter's (the rotation stays orthonormal)
                for pname, p in iv.named_parameters():
                    if "learned_source" in pname:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        folder = root / "adapters" / name
        reft.save_pretrained(folder)
        reft.unload()
        adapters[name] = folder
    g = torch.Generator().manual_seed(5)
    vector = SteeringVector({"L2.block_output": 3 * torch.randn(model.config.hidden_size, generator=g)})
    vfolder = root / "vectors" / "happy"
    vector.save(vfolder)
    return {"adapters": adapters, "vectors": {"happy": vfolder}, "root": root / "adapters"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, port: int | None = None):
    """Serve `app` with uvicorn in a thread on a free loopback port -> the base URL; stops it on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_app(assets, *, adapters=True, vectors=True, **config):
    from reftkit.serve.app import build_app
    from reftkit.serve.config import ServerConfig

    model, tok = model_and_tokenizer()
    config.setdefault("model_name", BASE)
    return build_app(model, tok, ServerConfig(**config), adapters=assets["adapters"] if adapters else {},
                     vectors=assets["vectors"] if vectors else {})


def client(url, **kw):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def async_client(url, **kw):
    import openai

    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def slow_down(app, seconds_per_forward: float):
    """Make every forward of the app's model take at least this long (a test-only hook), so that batches last
    long enough for clients to disconnect, queue up or race adapter updates. Returns the hook handle."""
    model = app.state.reftkit.batcher.engine.model

    def pause(module, args, kwargs):
        time.sleep(seconds_per_forward)

    return model.register_forward_pre_hook(pause, with_kwargs=True)


def metric(url: str, name: str, headers=None) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", headers=headers or {}).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
