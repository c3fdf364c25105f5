"""Start the server: bind the port, build the engine client (the model loads in the engine thread),
the metrics and the app, then run uvicorn on the bound socket. /health answers 503 until the model is
ready.

The port is bound and listened on first, so a busy port fails at once with a clear error (exit code 2
from the CLI) before anything is loaded or "serving ..." is logged (bound but not listening, two servers
could share the port until the second one's uvicorn failed, after its model had loaded). config.json is
parsed once here and the parsed ModelConfig goes down to the engine. When the model, tokenizer, chat
template or generation config cannot be loaded, `serve` stops and raises StartupError with the reason
(the CLI exits non-zero) instead of answering 503 forever; /health never said 200. SIGTERM / SIGINT
drain the requests in flight (`shutdown.py`).
"""

from __future__ import annotations

import logging
import socket

from kimi_linear.errors import KimiLinearError
from kimi_linear.server.api_server import ServerSettings, build_app
from kimi_linear.server.defaults import DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_SHUTDOWN_TIMEOUT_S
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.shutdown import UVICORN_GRACE_S, DrainingServer

logger = logging.getLogger(__name__)


class BindError(KimiLinearError):
    """The server cannot listen on the requested host and port."""


class StartupError(KimiLinearError):
    """The model (weights, tokenizer, chat template, generation config) could not be loaded."""


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
        sock.listen(2048)  # now: a socket that is only bound does not keep a second server off the port
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror or e}. Is another server using the port? "
                        f"Stop it or choose another with --port.") from None
    return sock


def make_server(engine_kwargs: dict, served_model_names: list[str], api_key: str | None = None,
                max_waiting: int = 4096, log_requests: bool = False,
                max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES):
    """(app, client): the FastAPI app and its started engine client (loading in the background)."""
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.engine.llm_engine import LLMEngine

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
    app = build_app(client, ServerSettings(served_model_names, api_key, log_requests,
                                           max_request_body_bytes=max_request_body_bytes), metrics)
    client.start()
    return app, client


def serve(engine_kwargs: dict, served_model_names: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_waiting: int = 4096, log_level: str = "info",
          uvicorn_log_level: str | None = None, log_requests: bool = False,
          max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Bind, start loading, serve until SIGTERM / SIGINT (then drain for up to `shutdown_timeout` s).
    Raises BindError (busy port) before loading anything, StartupError when the model cannot be loaded."""
    import threading

    import uvicorn

    sock = bind_socket(host, port)
    try:
        app, client = make_server(engine_kwargs, served_model_names, api_key, max_waiting, log_requests,
                                  max_request_body_bytes)
    except BaseException:
        sock.close()
        raise
    logger.info("serving %s on http://%s:%d (model loading in the background; /health is 503 until ready)",
                served_model_names[0], host, port)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level or log_level,
                                timeout_graceful_shutdown=UVICORN_GRACE_S)
        server = DrainingServer(config, client, shutdown_timeout)

        def stop_if_load_fails():
            if not client.wait_ready():
                server.should_exit = True

        threading.Thread(target=stop_if_load_fails, name="kimi-linear-load-watch", daemon=True).start()
        server.run(sockets=[sock])
    finally:
        client.shutdown()
        sock.close()
    if client.dead is not None and not client.ready.is_set():
        raise StartupError(client.dead)
