"""The OpenAI error envelope: {"error": {"message", "type", "param", "code"}} with the right status.

400 for every invalid field (and a prompt plus max_tokens beyond the context), 401 for a wrong API
key, 404 for an unknown model, 503 when the engine is loading, dead or its queue is full, 500 only
for our own bugs. A client's mistake is never a 500.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from kimi_linear.errors import ClientError, EngineDeadError, KimiLinearError, NotFoundError, OverloadedError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          500: "server_error", 503: "service_unavailable"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


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
