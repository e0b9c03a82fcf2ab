"""`reftkit serve` as a process: it starts from the command line, and after `kill -9` (in the middle of a
streamed reply) the same command brings back every adapter, the runtime-loaded ones included, with the same
replies. Also: `import reftkit` and the command table stay free of FastAPI and uvicorn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel

from .util import free_port

MSG = [{"role": "user", "content": "Hello"}]


def start(args, port, log):
    """The server's log goes to the file `log` (a pipe nobody reads would block it once full)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reftkit", "serve", "--model", "tiny-llama", "--port", str(port),
                             "--max-wait-ms", "5", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {Path(log).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start in 90 s")


def replies(url):
    out = {}
    for model in ("tiny-llama", "caps", "pirate"):
        r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 8,
                                                           "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        out[model] = r.json()["choices"][0]["message"]["content"]
    return out


def test_kill_9_then_restart_keeps_every_adapter(tmp_path):
    model = build_tiny_model("llama")  # what `--model tiny-llama` loads
    root = tmp_path / "adapters"
    for name, seed in (("caps", 1), ("pirate", 2)):
        reft = ReftModel(model, ReftConfig(layers=[1], rank=4, seed=seed), name)
        reft.save_pretrained(root / name)
        reft.unload()
    args = ["--adapter", f"caps={root / 'caps'}", "--adapter-dir", str(root), "--allow-adapter-updates"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = start(args, port, log)
    try:
        r = httpx.post(url + "/v1/adapters", json={"name": "pirate", "path": "pirate"}, timeout=30)
        assert r.status_code == 201, r.text
        before = replies(url)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"model": "pirate", "messages": MSG, "max_tokens": 500, "stream": True}) as s:
            next(s.iter_lines())
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    proc = start(args, port, log)
    try:
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("tiny-llama", None), ("caps", "tiny-llama"),
                                                           ("pirate", "tiny-llama")]
        assert replies(url) == before
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: the engine stops, then uvicorn re-raises the signal
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "server stopped" in log.read_text()


def test_import_reftkit_stays_free_of_the_server_stack():
    code = ("import sys, reftkit, reftkit.cli; from reftkit.cli import COMMANDS; assert 'serve' in COMMANDS; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_folders_fail_before_the_model_loads(tmp_path, capsys):
    from reftkit.cli import main

    assert main(["serve", "--adapter", f"x={tmp_path / 'nothing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--steer", f"v={tmp_path}"]) == 2
    assert "vector_config.json" in capsys.readouterr().err
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
