"""The FastAPI application: OpenAI routes, errors in OpenAI's shape, streaming, lifespan.

Decisions:
- `create_app(state)` builds the app around a `ServeState` (model, tokenizer, registry, engine, batcher,
  metrics, config), so tests build servers on tiny models in-process and the command line builds one on a real
  model; nothing is global.
- **Admission does all checks before a row is queued**: body size, JSON, parameters, the model and steering
  names, prompt length and `max_tokens` against the limits and the model's context (`context_length_exceeded`),
  then the queue depth (503). Only a request that can run reaches the engine.
- **Streaming** is hand-written SSE (`data: {...}\\n\\n`, then `data: [DONE]\\n\\n`). The first chunk of each
  chat choice carries the role; each later chunk one text delta; the last one of each choice its
  `finish_reason`; with `stream_options.include_usage` every chunk has `"usage": null` and one final chunk with
  empty `choices` carries the usage. A failure after the stream started is sent as a `{"error": ...}` chunk
  followed by `[DONE]` (what the openai client turns into an `APIError`).
- **Disconnects and timeouts**: when the client goes away (the streaming generator is closed, or a non-streamed
  request sees `http.disconnect`) or the request runs past `request_timeout_s`, its rows are cancelled and the
  engine drops them at its next step. The adapter reference is released when the request ends, however it ends.
- Runtime adapter routes (`GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}`) answer 403 unless the server
  was started with `--allow-adapter-updates`.
- `/playground` serves `static/playground.html` when that file exists (404 otherwise).
- **Structured logs**: every finished request logs one JSON object (id, model, steering, token counts, finish
  reasons, time to first token, latency) on the `reftkit.serve.app.access` logger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher
from .config import ServerConfig
from .metrics import Metrics
from .protocol import ApiError, GenerationRequest, bad, chunk_object, completion_object, parse_json, parse_request, \
    usage
from .registry import Registry
from .row import Row
from .security import ApiKeyMiddleware, read_body

log = logging.getLogger(__name__)
access = logging.getLogger(__name__ + ".access")  # one JSON object per finished request
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


@dataclass
class ServeState:
    tokenizer: object
    registry: Registry
    batcher: Batcher
    metrics: Metrics
    config: ServerConfig
    context_length: int | None = None


def build_state(reft, tokenizer, config: ServerConfig, registry: Registry) -> ServeState:
    from .generation import BatchEngine

    metrics = Metrics()
    engine = BatchEngine(reft, tokenizer, registry.vectors)
    batcher = Batcher(engine, registry.engine_lock, config, metrics)
    context = getattr(getattr(reft.model, "config", None), "max_position_embeddings", None)
    return ServeState(tokenizer, registry, batcher, metrics, config, context if isinstance(context, int) else None)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Request:
    """One admitted request: its rows, its event queue and its bookkeeping."""

    def __init__(self, state: ServeState, req: GenerationRequest, ids: list[int], adapter, max_tokens: int):
        self.state, self.req, self.adapter = state, req, adapter
        self.prompt_tokens = len(ids)
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event):
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        steer = tuple((n, c) for n, c in req.steer if c != 0.0)
        self.rows = [Row(ids=list(ids), adapter=adapter, steer=steer, max_tokens=max_tokens,
                         temperature=req.temperature, top_p=req.top_p,
                         seed=None if req.seed is None else req.seed + i, stop=req.stop, index=i, emit=emit)
                     for i in range(req.n)]
        self.texts = [""] * req.n
        self.reasons: list[str | None] = [None] * req.n
        self.tokens = [0] * req.n
        self.released = False

    def open(self) -> int:
        return sum(r is None for r in self.reasons)

    def cancel(self) -> None:
        for r in self.rows:
            if not r.finished:
                r.cancelled = True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cancel()
            self.state.registry.release(self.adapter)
            ttft = None if self.first_token is None else self.first_token - self.start
            e2e = time.monotonic() - self.start
            self.state.metrics.latency(ttft, e2e)
            access.info(json.dumps({"id": self.id, "kind": self.req.kind, "model": self.req.model,
                                    "steer": self.req.steer, "n": self.req.n, "stream": self.req.stream,
                                    "prompt_tokens": self.prompt_tokens, "completion_tokens": sum(self.tokens),
                                    "finish_reasons": self.reasons, "ttft_s": None if ttft is None else round(ttft, 4),
                                    "e2e_s": round(e2e, 4)}))

    def apply(self, event):
        """Record one event -> ("text", index, delta) | ("done", index, reason) | ("error", ApiError)."""
        kind, row = event[0], event[1]
        if kind == "text":
            if self.first_token is None:
                self.first_token = time.monotonic()
            self.texts[row.index] += event[2]
            return ("text", row.index, event[2])
        if kind == "done":
            if self.reasons[row.index] is None:
                self.reasons[row.index] = event[2]
                self.tokens[row.index] = event[3]
            return ("done", row.index, event[2])
        return ("error", event[2])

    async def next(self):
        left = self.state.config.request_timeout_s - (time.monotonic() - self.start)
        try:
            return self.apply(await asyncio.wait_for(self.events.get(), timeout=max(left, 0.001)))
        except asyncio.TimeoutError:
            self.cancel()
            return ("error", ApiError(408, f"The request took longer than this server's limit of "
                                           f"{self.state.config.request_timeout_s:g} s", type="timeout_error",
                                      code="request_timeout"))


def _prompt_ids(state: ServeState, req: GenerationRequest) -> list[int]:
    tok = state.tokenizer
    if req.kind == "chat":
        if not getattr(tok, "chat_template", None):
            raise bad("this model has no chat template; use /v1/completions", "messages", "unsupported_model")
        text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(req.prompt)["input_ids"]
    if not ids:
        raise bad("the prompt is empty", "prompt" if req.kind == "completion" else "messages", "invalid_value")
    return list(ids)


def _limits(state: ServeState, req: GenerationRequest, prompt_tokens: int) -> int:
    cfg, where = state.config, ("messages" if req.kind == "chat" else "prompt")
    if prompt_tokens > cfg.max_prompt_tokens:
        raise bad(f"This server's maximum prompt length is {cfg.max_prompt_tokens} tokens. However, your "
                  f"{where} resulted in {prompt_tokens} tokens. Please reduce the length of the {where}.", where,
                  "context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else cfg.max_new_tokens
    if state.context_length is not None and prompt_tokens + max_tokens > state.context_length:
        if req.max_tokens is None:
            max_tokens = state.context_length - prompt_tokens
        if max_tokens < 1 or req.max_tokens is not None:
            raise bad(f"This model's maximum context length is {state.context_length} tokens. However, you "
                      f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, "
                      f"{max_tokens} for the completion). Please reduce the length of the {where} or max_tokens.",
                      "max_tokens" if req.max_tokens is not None else where, "context_length_exceeded")
    return max_tokens


async def _admit(state: ServeState, request: Request, kind: str) -> _Request:
    raw = await read_body(request, state.config.max_body_bytes)
    req = parse_request(kind, parse_json(raw), state.config)
    ids = _prompt_ids(state, req)
    max_tokens = _limits(state, req, len(ids))
    adapter = state.registry.acquire(req.model, [n for n, _ in req.steer])
    try:
        admitted = _Request(state, req, ids, adapter, max_tokens)
        state.batcher.submit(admitted.rows)
    except BaseException:
        state.registry.release(adapter)
        raise
    return admitted


async def _complete(state: ServeState, request: Request, a: _Request) -> JSONResponse:
    try:
        while a.open():
            try:
                event = await asyncio.wait_for(a.next(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    a.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "error":
                raise event[1]
        obj = completion_object(a.req, a.id, a.created, a.texts, a.reasons, a.prompt_tokens, sum(a.tokens))
        return JSONResponse(obj)
    finally:
        a.release()


async def _stream(state: ServeState, a: _Request):
    req = a.req
    try:
        if req.kind == "chat":
            for i in range(req.n):
                yield _sse(chunk_object(req, a.id, a.created, i, role=True, text=""))
        while a.open():
            event = await a.next()
            if event[0] == "text":
                yield _sse(chunk_object(req, a.id, a.created, event[1], text=event[2]))
            elif event[0] == "done":
                reason = event[2] if event[2] in ("stop", "length") else "stop"
                yield _sse(chunk_object(req, a.id, a.created, event[1], finish_reason=reason,
                                        text=None if req.kind == "chat" else ""))
            else:
                yield _sse(event[1].body())
                break
        else:
            if req.include_usage:
                yield _sse(chunk_object(req, a.id, a.created, None,
                                        usage_value=usage(a.prompt_tokens, sum(a.tokens))))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the generator is closed and the rows are cancelled
        a.release()


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        log.info("serving %s with adapters %s and steering vectors %s", state.registry.base_name,
                 list(state.registry.adapters), list(state.registry.vectors))
        yield
        await asyncio.to_thread(state.batcher.close, state.config.shutdown_grace_s)
        log.info("server stopped")

    app = FastAPI(title="reftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.reftkit = state
    if state.config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=state.config.api_keys)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        state.metrics.request(request.url.path, e.status)
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        state.metrics.request(request.url.path, e.status_code)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        code=codes.get(e.status_code)))

    @app.exception_handler(Exception)
    async def unexpected(request, e):
        log.exception("unexpected error on %s", request.url.path)
        state.metrics.request(request.url.path, 500)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                                        code="internal_error"))

    @app.get("/health")
    async def health():
        ok = state.batcher.accepting and state.batcher.thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "unavailable", "queue_depth": state.batcher.depth()},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth = state.batcher.depth()
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return JSONResponse(state.registry.models())

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name not in state.registry.model_names():
            from .protocol import model_not_found

            raise model_not_found(name, state.registry.model_names())
        return JSONResponse(state.registry.describe(name))

    async def generate(request: Request, kind: str, endpoint: str):
        a = await _admit(state, request, kind)
        state.metrics.request(endpoint, 200)
        if a.req.stream:
            return StreamingResponse(_stream(state, a), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(state, request, a)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion", "/v1/completions")

    @app.get("/v1/adapters")
    async def adapters():
        state.registry.require_updates()
        reg = state.registry
        return JSONResponse({"object": "list", "data": [
            {**reg.describe(n), "runtime": a["runtime"], "in_use": reg.in_use(n)} for n, a in list(reg.adapters.items())]})

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        state.registry.require_updates()
        body = parse_json(await read_body(request, state.config.max_body_bytes))
        extra = set(body) - {"name", "path"}
        if extra:
            key = sorted(extra)[0]
            raise bad(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
        for key in ("name", "path"):
            if key not in body:
                raise bad(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
        described = await asyncio.to_thread(state.registry.load, body["name"], body["path"])
        return JSONResponse(described, status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await asyncio.to_thread(state.registry.unload, name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    @app.get("/playground")
    async def playground():
        if not PLAYGROUND.is_file():
            raise ApiError(404, "the playground page is not installed in this build", code="not_found")
        return FileResponse(PLAYGROUND, media_type="text/html")

    return app


def build_app(model, tokenizer, config: ServerConfig, *, adapters: dict | None = None, vectors: dict | None = None):
    """The server for `model` (a plain model; it is frozen and wrapped in a `ReftModel`) with `adapters`
    ({name: folder}) and steering `vectors` ({name: folder}) loaded, plus the adapters an earlier run registered
    at runtime in `config.adapter_dir`. Returns the FastAPI app (its `state.reftkit` is the `ServeState`)."""
    from ..reft.model import ReftModel

    reft = model if isinstance(model, ReftModel) else ReftModel(model)
    registry = Registry(config.model_name, reft, adapter_dir=config.adapter_dir,
                        allow_updates=config.allow_adapter_updates)
    for name, folder in (adapters or {}).items():
        registry.add_adapter(name, folder)
    for name, folder in (vectors or {}).items():
        registry.add_vector(name, folder)
    restored = registry.restore()
    if restored:
        log.info("restored runtime adapters %s from %s", restored, config.adapter_dir)
    return create_app(build_state(reft, tokenizer, config, registry))
