"""API keys and the request-body limit.

- **Keys**: `Authorization: Bearer <key>`; the presented key is hashed (SHA-256) and compared with every
  configured key's digest by `hmac.compare_digest`, so neither the comparison time nor an early exit reveals
  how much of a key matched. Without configured keys the server is open. `/health` (and the static playground
  page, which holds no data and asks for the key itself) are always open; everything else needs a key. The
  check is a pure ASGI middleware, so it also covers unknown paths (401 before 404) and answers in OpenAI's error
  shape.
- **Body limit**: a `Content-Length` over the limit is refused before the body is read; a body without one is
  read in chunks and refused (413) as soon as it passes the limit, so an endless body costs at most the limit.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from .protocol import ApiError

OPEN_PATHS = ("/health", "/playground")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(presented: str | None, digests: list[bytes]) -> bool:
    if presented is None:
        return False
    d = digest(presented)
    ok = False
    for expected in digests:
        ok |= hmac.compare_digest(d, expected)  # every key is compared: no early exit
    return ok


class ApiKeyMiddleware:
    def __init__(self, app, keys: list[str]):
        self.app = app
        self.digests = [digest(k) for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or scope["path"] in OPEN_PATHS \
                or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.digests):
            return await self.app(scope, receive, send)
        missing = not header
        error = ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'." if missing
                         else "Incorrect API key provided.", type="authentication_error",
                         code="missing_api_key" if missing else "invalid_api_key")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server's limit of {limit} bytes", param=None,
                    code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise too_large(limit)
        except ValueError:
            raise ApiError(400, "Content-Length is not an integer", code="invalid_value") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
