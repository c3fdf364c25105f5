"""The FastAPI app: routes, API-key check, and the OpenAI error envelope for every failure.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /v1/models/{id}, /health (503 while loading
or after the engine died), /metrics (Prometheus), /tokenize, /detokenize, /tokenizer_info, /version.
Every client mistake is a 4xx in the OpenAI envelope (FastAPI's 422s become 400s naming the field); only
our own bugs are 500s.

Request ids (as vLLM): an incoming `X-Request-Id` header becomes the request's id (`cmpl-<it>`,
`chatcmpl-<it>`) and is echoed in the response's `X-Request-Id`; without one the response carries the
generated id. Every response is logged on `kimi_linear.server.access` with its request id.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_linear.errors import KimiLinearError
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.errors import error_response, exception_response
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kimi_linear.server.serving import MAX_REQUEST_ID_LEN, now
from kimi_linear.server.serving_chat import ServingChat
from kimi_linear.server.serving_completions import ServingCompletions
from kimi_linear.server.serving_tokenization import ServingTokenization

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("kimi_linear.server.access")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    log_requests: bool = False  # log each request's id, prompt length and sampling params
    tool_call_parser: str | None = None  # --tool-call-parser (server/tool_parsers)
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" parses the output


def _param_of(loc: tuple) -> str | None:
    parts = [str(x) for x in loc if x not in ("body", "query", "path")]
    return ".".join(parts) or None


def build_app(client: AsyncEngineClient, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    from kimi_linear import __version__

    app = FastAPI(title="kimi_linear", version=__version__)
    chat = ServingChat(client, settings.served_model_names, settings.log_requests,
                       tool_call_parser=settings.tool_call_parser,
                       enable_auto_tool_choice=settings.enable_auto_tool_choice)
    completions = ServingCompletions(client, settings.served_model_names, settings.log_requests)
    tokenization = ServingTokenization(client, settings.served_model_names)
    app.state.client = client

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        param = _param_of(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif param:
            msg = f"{param}: {msg}"
        return error_response(msg, 400, param)

    @app.exception_handler(KimiLinearError)
    async def _ours(request: Request, exc: KimiLinearError):
        return exception_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(f"internal server error: {type(exc).__name__}", 500)

    # ------------------------------------------------------------------ auth
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response("invalid or missing API key", 401)
        return await call_next(request)

    # Added after _auth, so it wraps it: 401s get their id and access-log line too.
    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        incoming = request.headers.get("x-request-id")
        t0 = time.perf_counter()
        if incoming is not None and not 0 < len(incoming) <= MAX_REQUEST_ID_LEN:
            response = error_response(f"the X-Request-Id header must have 1 to {MAX_REQUEST_ID_LEN} characters",
                                      400, "X-Request-Id")
        else:
            request.state.incoming_request_id = incoming
            response = await call_next(request)
        rid = incoming or getattr(request.state, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-Id"] = rid
        peer = f"{request.client.host}:{request.client.port}" if request.client else "-"
        access_logger.info('%s "%s %s" %d request_id=%s %.1fms', peer, request.method, request.url.path,
                           response.status_code, rid, (time.perf_counter() - t0) * 1e3)
        return response

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if client.dead is not None:
            return error_response(f"the engine died: {client.dead}", 503)
        if not client.ready.is_set():
            return error_response("Loading model", 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": now(), "owned_by": "kimi_linear",
                "root": client.engine.model_path, "parent": None, "max_model_len": client.engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        client.check_available()
        return {"object": "list", "data": [model_card(name) for name in settings.served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        chat.check_model(model_id)  # 404 naming the served models
        client.check_available()
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await chat.create(req, raw)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request):
        return await completions.create(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        return tokenization.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return tokenization.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenization.tokenizer_info()

    return app

