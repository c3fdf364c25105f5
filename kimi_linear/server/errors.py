"""The OpenAI error envelope: {"error": {"message", "type", "param", "code"}} with the right status.

400 for every invalid field (and a prompt plus max_tokens beyond the context), 401 for a wrong API
key, 404 for an unknown model, 405 for a wrong method (with `Allow`), 413 for a body over the limit,
503 when the engine is loading, dead, shutting down or its queue is full (with `Retry-After`), 500 only
for our own bugs and for a model that produced non-finite logits. A client's mistake is never a 500.
Bodies are built by `SafeJSONResponse`, so any string the client sent can be echoed.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from kimi_linear.errors import ClientError, EngineDeadError, KimiLinearError, NotFoundError, OverloadedError
from kimi_linear.server.safe_text import SafeJSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          500: "server_error", 503: "service_unavailable"}
RETRY_AFTER_S = 1  # the Retry-After hint of a 503 (overloaded, loading, shutting down)


class GenerationError(KimiLinearError):
    """The model failed on this request (non-finite logits): a 500, not the client's fault."""


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code if code is not None else status}}


def error_response(message: str, status: int, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return SafeJSONResponse(error_body(message, status, param, code), status_code=status, headers=headers or None)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ClientError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (EngineDeadError, OverloadedError)):
        return 503
    return 500


def exception_response(exc: KimiLinearError) -> JSONResponse:
    return error_response(str(exc), status_of(exc), getattr(exc, "param", None))
