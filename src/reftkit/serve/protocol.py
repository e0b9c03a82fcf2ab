"""The OpenAI wire protocol: request validation and the objects the server answers with.

Decisions:
- **Errors have one shape**, OpenAI's: `{"error": {"message", "type", "param", "code"}}` with `code` a string or
  null (the openai client's `ErrorObject`), never FastAPI's `{"detail": ...}`. `ApiError` carries the HTTP status
  and headers (503 adds `Retry-After`); the app turns every failure into one, unexpected ones into a 500.
- **Validation is by hand, not by pydantic models**, so each refusal names the exact `param` path
  (`messages[1].content`, `reftkit.steer[0].coefficient`) and an OpenAI-style `code` (`invalid_type`,
  `integer_below_min_value`, `missing_required_parameter`, `unknown_parameter`, `unsupported_parameter`, ...),
  and is a 400 where FastAPI would answer 422.
- **Honoured or refused**: `max_tokens` (`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `n`,
  `stream`, `stream_options.include_usage` are honoured. Parameters that would change the reply in ways this
  server does not implement (`tools`, `logprobs`, penalties, `logit_bias`, `echo`, `best_of`, `suffix`, JSON
  response formats) are accepted only at their neutral value and otherwise refused with `unsupported_parameter`;
  `user`, `metadata`, `store`, `service_tier` and `parallel_tool_calls` are accepted and ignored; anything else
  is `unknown_parameter`.
- **The extension key** `reftkit` (sent by the openai client as `extra_body={"reftkit": {...}}`) holds
  `steer: [{"name", "coefficient"}, ...]`; names are resolved against the registry at admission, so an unknown
  vector never reaches the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .config import ServerConfig

INVALID = "invalid_request_error"


class ApiError(Exception):
    """A failure answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(name: str, known: list[str]) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist. Available models: {', '.join(known)}",
                    param="model", code="model_not_found")


def overloaded(message: str = "The server is overloaded: its request queue is full; retry later") -> ApiError:
    return ApiError(503, message, type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})


@dataclass
class GenerationRequest:
    """A validated request: what to generate, for which adapter and steering, with which sampling."""

    kind: str                       # "chat" or "completion"
    model: str
    messages: list | None = None    # chat: [{"role", "content": str}]
    prompt: str | None = None       # completion
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    steer: list[tuple[str, float]] = field(default_factory=list)


IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
NEUTRAL = {  # accepted only at their neutral value
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v is None,
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "reftkit"}
ROLES = ("system", "developer", "user", "assistant")


def parse_json(raw: bytes):
    try:
        body = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"We could not parse the JSON body of your request ({type(e).__name__}: {e}); expected a JSON "
                  "object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body, key, minimum, maximum=None, *, over_code="integer_above_max_value"):
    v = body[key]
    if not _is_int(v):
        raise bad(f"Invalid type for '{key}': expected an integer, but got {type(v).__name__} instead.", key,
                  "invalid_type")
    if v < minimum:
        raise bad(f"Invalid '{key}': integer below minimum value. Expected a value >= {minimum}, but got {v} "
                  "instead.", key, "integer_below_min_value")
    if maximum is not None and v > maximum:
        raise bad(f"Invalid '{key}': integer above maximum value. Expected a value <= {maximum}, but got {v} "
                  "instead.", key, over_code)
    return v


def _number(body, key, low, high, *, low_open=False):
    v = body[key]
    if not _is_number(v):
        raise bad(f"Invalid type for '{key}': expected a finite number, but got {type(v).__name__} instead.", key,
                  "invalid_type")
    if v < low or (low_open and v == low):
        raise bad(f"Invalid '{key}': decimal below minimum value. Expected a value {'>' if low_open else '>='} {low},"
                  f" but got {v} instead.", key, "decimal_below_min_value")
    if v > high:
        raise bad(f"Invalid '{key}': decimal above maximum value. Expected a value <= {high}, but got {v} instead.",
                  key, "decimal_above_max_value")
    return float(v)


def _check_keys(body: dict, allowed: set) -> None:
    for key in body:
        if key in allowed or key in IGNORED:
            continue
        if key in NEUTRAL:
            if not NEUTRAL[key](body[key]):
                raise bad(f"'{key}' is not supported by this server (only its default value is accepted)", key,
                          "unsupported_parameter")
            continue
        raise bad(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"Invalid '{where}[{j}]': only text parts {{\"type\": \"text\", \"text\": ...}} are "
                          "supported", f"{where}[{j}]", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"Invalid type for '{where}': expected a string or an array of text parts, but got "
              f"{type(value).__name__} instead.", where, "invalid_type")


def _messages(body: dict) -> list:
    if "messages" not in body:
        raise bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise bad(f"Invalid type for 'messages': expected an array, but got {type(messages).__name__} instead.",
                  "messages", "invalid_type")
    if not messages:
        raise bad("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array "
                  "instead.", "messages", "empty_array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"Invalid type for '{where}': expected an object, but got {type(m).__name__} instead.", where,
                      "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}, got {role!r}",
                      f"{where}.role", "invalid_value")
        if "content" not in m:
            raise bad(f"Missing required parameter: '{where}.content'.", f"{where}.content",
                      "missing_required_parameter")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"Unrecognized argument in '{where}': {sorted(extra)[0]}", f"{where}.{sorted(extra)[0]}",
                      "unknown_parameter")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m["content"],
                                                                                          f"{where}.content")})
    return out


def _prompt(body: dict) -> str:
    if "prompt" not in body:
        raise bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, list):
        raise bad("'prompt' must be one string here (batches of prompts and token-id prompts are not supported; "
                  "send one request per prompt)", "prompt", "unsupported_parameter")
    if not isinstance(p, str):
        raise bad(f"Invalid type for 'prompt': expected a string, but got {type(p).__name__} instead.", "prompt",
                  "invalid_type")
    return p


def _stop(value, config: ServerConfig) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("Invalid type for 'stop': expected a string or an array of strings.", "stop", "invalid_type")
    if len(stops) > config.max_stop:
        raise bad(f"Invalid 'stop': array too long. Expected at most {config.max_stop} stop sequences, got "
                  f"{len(stops)}.", "stop", "array_above_max_length")
    if any(not s for s in stops):
        raise bad("Invalid 'stop': stop sequences cannot be empty strings.", "stop", "invalid_value")
    return list(dict.fromkeys(stops))


def _extension(value, config: ServerConfig) -> list[tuple[str, float]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise bad("Invalid type for 'reftkit': expected an object such as {\"steer\": [{\"name\": ..., "
                  "\"coefficient\": ...}]}.", "reftkit", "invalid_type")
    for key in value:
        if key != "steer":
            raise bad(f"Unrecognized argument in 'reftkit': {key} (expected: steer)", f"reftkit.{key}",
                      "unknown_parameter")
    steer = value.get("steer") or []
    if not isinstance(steer, list):
        raise bad("Invalid type for 'reftkit.steer': expected an array of {\"name\", \"coefficient\"} objects.",
                  "reftkit.steer", "invalid_type")
    if len(steer) > config.max_steer:
        raise bad(f"Invalid 'reftkit.steer': at most {config.max_steer} steering vectors per request, got "
                  f"{len(steer)}.", "reftkit.steer", "array_above_max_length")
    out = []
    for i, item in enumerate(steer):
        where = f"reftkit.steer[{i}]"
        if not isinstance(item, dict):
            raise bad(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        extra = set(item) - {"name", "coefficient"}
        if extra:
            key = sorted(extra)[0]
            raise bad(f"Unrecognized argument in '{where}': {key}", f"{where}.{key}", "unknown_parameter")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"Invalid '{where}.name': expected the name of a steering vector (see GET /v1/models).",
                      f"{where}.name", "invalid_type" if name is not None else "missing_required_parameter")
        c = item.get("coefficient", 1.0)
        if not _is_number(c):
            raise bad(f"Invalid type for '{where}.coefficient': expected a finite number, but got "
                      f"{type(c).__name__} instead.", f"{where}.coefficient", "invalid_type")
        if abs(c) > config.max_coefficient:
            raise bad(f"Invalid '{where}.coefficient': its magnitude is limited to {config.max_coefficient:g}.",
                      f"{where}.coefficient", "decimal_above_max_value")
        out.append((name, float(c)))
    return out


def parse_request(kind: str, body: dict, config: ServerConfig) -> GenerationRequest:
    """Validate a chat (`kind="chat"`) or completion body; raises `ApiError` (400) naming the parameter."""
    allowed = COMMON | ({"messages", "max_completion_tokens"} if kind == "chat" else {"prompt"})
    _check_keys(body, allowed)
    if "model" not in body:
        raise bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(body["model"], str) or not body["model"]:
        raise bad("Invalid type for 'model': expected a non-empty string.", "model", "invalid_type")
    req = GenerationRequest(kind=kind, model=body["model"])
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            req.max_tokens = _int(body, key, 1, config.max_new_tokens, over_code="context_length_exceeded")
    if body.get("temperature") is not None:
        req.temperature = _number(body, "temperature", 0.0, 2.0)
    if body.get("top_p") is not None:
        req.top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if body.get("seed") is not None:
        req.seed = _int(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    req.stop = _stop(body.get("stop"), config)
    if body.get("n") is not None:
        req.n = _int(body, "n", 1, config.max_n)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options",
                      "invalid_value")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("Invalid 'stream_options': expected an object with 'include_usage'.", "stream_options",
                      "invalid_type")
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise bad("Invalid type for 'stream_options.include_usage': expected a boolean.",
                      "stream_options.include_usage", "invalid_type")
        req.include_usage = usage
    req.steer = _extension(body.get("reftkit"), config)
    return req


# ---- responses ------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(req: GenerationRequest, rid: str, created: int, texts: list[str], reasons: list[str],
                      prompt_tokens: int, completion_tokens: int) -> dict:
    if req.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk_object(req: GenerationRequest, rid: str, created: int, index: int | None, *, text: str | None = None,
                 role: bool = False, finish_reason: str | None = None, usage_value: dict | None = None) -> dict:
    """One streamed chunk. `index=None` is the final usage chunk (empty `choices`)."""
    if req.kind == "chat":
        obj = "chat.completion.chunk"
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        obj = "text_completion"
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    out = {"id": rid, "object": obj, "created": created, "model": req.model,
           "choices": [] if index is None else [choice], "system_fingerprint": None}
    if req.include_usage:
        out["usage"] = usage_value
    return out
