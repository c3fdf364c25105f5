"""The FastAPI app: routes, API-key check, and the OpenAI error envelope for every failure.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /v1/models/{id}, /health (503 while loading
or after the engine died), /metrics (Prometheus), /tokenize, /detokenize, /tokenizer_info, /version.
Every client mistake is a 4xx in the OpenAI envelope (FastAPI's 422s become 400s naming the field); only
our own bugs are 500s.

Request ids (as vLLM): an incoming `X-Request-Id` header becomes the request's id (`cmpl-<it>`,
`chatcmpl-<it>`) and is echoed in the response's `X-Request-Id`; without one the response carries the
generated id. Every response is logged on `kimi_linear.server.access` with its request id.

Request ids, the API key and the body-size limit are pure ASGI middleware (`middleware.py`), so a
client's disconnect reaches the handlers; bodies are decoded and validated off the event loop
(`request_body.py`), and so are tokenization and chat templates, so a huge request never stalls others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_linear.errors import KimiLinearError
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.errors import error_response, exception_response
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.middleware import GuardMiddleware, RequestIdMiddleware
from kimi_linear.server.openapi import install_openapi
from kimi_linear.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kimi_linear.server.request_body import parse_body
from kimi_linear.server.safe_text import SafeJSONResponse, dumps, int_list_json, redact_paths
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
    max_request_body_bytes: int | None = None  # larger bodies get 413 (None: no limit)


def _param_of(loc: tuple) -> str | None:
    parts = [str(x) for x in loc if x not in ("body", "query", "path")]
    return ".".join(parts) or None


def build_app(client: AsyncEngineClient, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    from kimi_linear import __version__

    app = FastAPI(title="kimi_linear", version=__version__, default_response_class=SafeJSONResponse)
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
    async def _http(request: Request, exc: StarletteHTTPException):  # 404, 405 (with Allow), 413
        return error_response(str(exc.detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(f"internal server error: {type(exc).__name__}", 500)

    # ------------------------------------------------------------------ auth, body limit
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_request_body_bytes)

    # Added after the guard, so it wraps it: 401s / 413s get their id and access-log line too.
    app.add_middleware(RequestIdMiddleware, max_len=MAX_REQUEST_ID_LEN, access_logger=access_logger)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if client.dead is not None:  # unauthenticated: no file paths of the server in the message
            return error_response(redact_paths(f"the engine died: {client.dead}"), 503)
        if not client.ready.is_set():
            return error_response("Loading model", 503)
        return SafeJSONResponse({"status": "ok"})

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
    async def chat_completions(raw: Request):
        req = await parse_body(raw, ChatCompletionRequest)
        return await chat.create(req, raw)

    @app.post("/v1/completions")
    async def create_completion(raw: Request):
        req = await parse_body(raw, CompletionRequest)
        return await completions.create(req, raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        req = await parse_body(raw, TokenizeRequest)
        return await asyncio.to_thread(_tokenize, req)

    def _tokenize(req: TokenizeRequest) -> Response:  # in a worker thread, the answer rendered here too:
        out = tokenization.tokenize(req)              # FastAPI would walk a dict's millions of ids on the loop
        ids = out.pop("tokens")
        return Response(f'{{"tokens":{int_list_json(ids)},{dumps(out)[1:]}', media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        req = await parse_body(raw, DetokenizeRequest)
        return await asyncio.to_thread(lambda: SafeJSONResponse(tokenization.detokenize(req)))  # rendered off the loop

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenization.tokenizer_info()

    install_openapi(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest},
                    api_key=bool(settings.api_key))
    return app

