"""Pure ASGI guard in front of the app: the API-key check and the request-body size limit.

Pure ASGI (not Starlette's BaseHTTPMiddleware) on purpose: BaseHTTPMiddleware runs the app behind its
own receive channel, which hides the client's `http.disconnect` from `Request.is_disconnected()`, so a
non-streaming client that left was never aborted. Here `receive` passes straight through.

- With an API key, the routes that run the model or the tokenizer (`/v1/...`, `/tokenize`,
  `/detokenize`) need `Authorization: Bearer KEY` (401 otherwise); `/health`, `/metrics`, `/version`
  and the docs stay open.
- A body larger than `max_body_bytes` is a 413: at once when Content-Length says so, else as soon as
  the bytes received pass the limit (the route reading the body gets an HTTPException(413), which the
  app's handler turns into the OpenAI envelope).
"""

from __future__ import annotations

import secrets

from starlette.exceptions import HTTPException

from kimi_linear.server.errors import error_response

PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


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
