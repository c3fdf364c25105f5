"""Pure ASGI middleware in front of the app: request ids and the access log (`RequestIdMiddleware`), the
API-key check and the request-body size limit (`GuardMiddleware`).

Pure ASGI (never Starlette's BaseHTTPMiddleware, `@app.middleware("http")`) on purpose: BaseHTTPMiddleware
runs the app behind its own receive channel, which hides the client's `http.disconnect` from
`Request.is_disconnected()`, so a non-streaming client that left was never aborted. Here `receive`
passes straight through.

- Request ids (as vLLM): an incoming `X-Request-Id` (1 to `max_len` characters, else a 400) is put on the
  request's state (`incoming_request_id`) for the handlers; the response carries `X-Request-Id`: the
  incoming one, else the id a handler recorded (`state.request_id`), else a fresh one. When the response
  ends, one access-log line names the method, path, status, request id and duration.

- With an API key, the routes that run the model or the tokenizer (`/v1/...`, `/tokenize`,
  `/detokenize`) need `Authorization: Bearer KEY` (401 otherwise); `/health`, `/metrics`, `/version`
  and the docs stay open.
- A body larger than `max_body_bytes` is a 413: at once when Content-Length says so, else as soon as
  the bytes received pass the limit (the route reading the body gets an HTTPException(413), which the
  app's handler turns into the OpenAI envelope).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid

from starlette.exceptions import HTTPException

from kimi_linear.server.errors import error_response

PROTECTED_PATHS = ("/tokenize", "/detokenize")  # besides every /v1 route


def is_protected(path: str) -> bool:
    return path.startswith("/v1") or path in PROTECTED_PATHS


def too_large_message(limit: int) -> str:
    return f"the request body exceeds {limit} bytes (the server's --max-request-body-bytes)"


class GuardMiddleware:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and is_protected(scope.get("path", "")):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.api_key):
                return await error_response("invalid or missing API key", 401)(scope, receive, send)
        limit = self.max_body_bytes
        if limit is None:
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_response(too_large_message(limit), 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large_message(limit))
            return message

        return await self.app(scope, limited_receive, send)


class RequestIdMiddleware:
    def __init__(self, app, max_len: int, access_logger: logging.Logger):
        self.app = app
        self.max_len = max_len
        self.access_logger = access_logger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        raw = dict(scope.get("headers") or []).get(b"x-request-id")
        incoming = raw.decode("latin-1") if raw is not None else None
        state = scope.setdefault("state", {})
        status, fresh = 500, []

        def request_id() -> str:
            if incoming:
                return incoming
            if state.get("request_id"):
                return state["request_id"]
            if not fresh:
                fresh.append(uuid.uuid4().hex)
            return fresh[0]

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id().encode("latin-1"))]}
            await send(message)

        try:
            if incoming is not None and not 0 < len(incoming) <= self.max_len:
                response = error_response(f"the X-Request-Id header must have 1 to {self.max_len} characters", 400,
                                          "X-Request-Id")
                await response(scope, receive, send_with_id)
            else:
                state["incoming_request_id"] = incoming
                await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            self.access_logger.info('%s "%s %s" %d request_id=%s %.1fms', peer, scope.get("method"), scope.get("path"),
                                    status, request_id(), (time.perf_counter() - t0) * 1e3)
