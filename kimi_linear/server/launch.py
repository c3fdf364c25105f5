"""Start the server: bind the port, build the engine client (the model loads in the engine thread),
the metrics and the app, then run uvicorn on the bound socket. /health answers 503 until the model is
ready.

The port is bound first, so a busy port fails at once with a clear error (exit code 2 from the CLI)
before anything is loaded or "serving ..." is logged. config.json is parsed once here and the parsed
ModelConfig goes down to the engine.
"""

from __future__ import annotations

import logging
import socket

from kimi_linear.errors import KimiLinearError
from kimi_linear.server.api_server import ServerSettings, build_app
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class BindError(KimiLinearError):
    """The server cannot listen on the requested host and port."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (uvicorn listens on it). Raises BindError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like uvicorn: rebind over TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror or e}. Is another server using the port? "
                        f"Stop it or choose another with --port.") from None
    return sock


def make_server(engine_kwargs: dict, served_model_names: list[str], api_key: str | None = None,
                max_waiting: int = 4096, log_requests: bool = False, tool_call_parser: str | None = None,
                enable_auto_tool_choice: bool = False):
    """(app, client): the FastAPI app and its started engine client (loading in the background)."""
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.engine.llm_engine import LLMEngine
    from kimi_linear.server.tool_parsers import check_tool_flags

    check_tool_flags(tool_call_parser, enable_auto_tool_choice)

    # Invalid flags or a bad config.json fail here, before the server starts; weight-loading failures
    # happen in the engine thread and show as a dead engine (/health 503 with the reason).
    config = EngineConfig.from_kwargs(**engine_kwargs)
    model_config = config.load_model_config()

    def on_finished(out, t):
        c0 = out.outputs[0] if out.outputs else None
        metrics.request_finished(
            prompt_tokens=len(out.prompt_token_ids),
            generation_tokens=sum(len(c.token_ids) for c in out.outputs),
            finish_reason=(c0.finish_reason if c0 else None) or "abort",
            ttft=(t.first_token - t.arrival) if t.first_token else None, itls=t.itls,
            e2e=(t.last_token or t.arrival) - t.arrival, queue_time=None)

    client = AsyncEngineClient(lambda: LLMEngine(config, model_config=model_config), max_waiting=max_waiting,
                               on_finished=on_finished)
    metrics = ServerMetrics(served_model_names[0], stats=client.stats)
    app = build_app(client, ServerSettings(served_model_names, api_key, log_requests, tool_call_parser,
                                           enable_auto_tool_choice), metrics)
    client.start()
    return app, client


def serve(engine_kwargs: dict, served_model_names: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_waiting: int = 4096, log_level: str = "info",
          uvicorn_log_level: str | None = None, log_requests: bool = False, tool_call_parser: str | None = None,
          enable_auto_tool_choice: bool = False) -> None:
    """Bind, start loading, serve until interrupted. Raises BindError (busy port) before loading anything."""
    import uvicorn

    sock = bind_socket(host, port)
    try:
        app, client = make_server(engine_kwargs, served_model_names, api_key, max_waiting, log_requests,
                                  tool_call_parser, enable_auto_tool_choice)
    except BaseException:
        sock.close()
        raise
    logger.info("serving %s on http://%s:%d (model loading in the background; /health is 503 until ready)",
                served_model_names[0], host, port)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level or log_level,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        client.shutdown()
        sock.close()
