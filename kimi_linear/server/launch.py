"""Start the server: bind the port, build the engine client (the model loads in the engine thread),
the metrics and the app, then run uvicorn on the bound socket. /health answers 503 until the model is
ready.

The port is bound and listened on first, so a busy port fails at once with a clear error (exit code 2
from the CLI) before anything is loaded or "serving ..." is logged (bound but not listening, two servers
could share the port until the second one's uvicorn failed, after its model had loaded). config.json is
parsed once here and the parsed ModelConfig goes down to the engine. Once the model is loaded, one log
block (`startup_summary`) gives the resolved engine config, the model's shape and dtype, and the cache
capacity. uvicorn's access log is replaced by the app's own (`kimi_linear.server.access`), which names
each request's id. When the model, tokenizer, chat template or generation config cannot be loaded,
`serve` stops and raises StartupError with the reason (the CLI exits non-zero) instead of answering 503
forever; /health never said 200. SIGTERM / SIGINT drain the requests in flight (`shutdown.py`).
"""

from __future__ import annotations

import logging
import socket
import time

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


class EngineDiedError(KimiLinearError):
    """An engine step failed while serving: the server stopped (a supervisor should restart it)."""


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
                max_waiting: int = 4096, log_requests: bool = False, tool_call_parser: str | None = None,
                enable_auto_tool_choice: bool = False,
                max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES):
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
        metrics.request_finished(**finished_request_metrics(out, t, time.monotonic()))

    def on_ready(engine):
        logger.info("%s", startup_summary(engine.describe(), served_model_names))

    client = AsyncEngineClient(lambda: LLMEngine(config, model_config=model_config), max_waiting=max_waiting,
                               on_finished=on_finished, on_step=lambda s: metrics.engine_step(s), on_ready=on_ready)
    metrics = ServerMetrics(served_model_names[0], stats=client.stats)
    app = build_app(client, ServerSettings(served_model_names, api_key, log_requests, tool_call_parser,
                                           enable_auto_tool_choice, max_request_body_bytes=max_request_body_bytes),
                    metrics)
    client.start()
    return app, client


def serve(engine_kwargs: dict, served_model_names: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_waiting: int = 4096, log_level: str = "info",
          uvicorn_log_level: str | None = None, log_requests: bool = False, tool_call_parser: str | None = None,
          enable_auto_tool_choice: bool = False, max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Bind, start loading, serve until SIGTERM / SIGINT (then drain for up to `shutdown_timeout` s).
    Raises BindError (busy port) before loading anything, StartupError when the model cannot be loaded,
    EngineDiedError after a failed engine step (the requests in flight got their error first)."""
    import threading

    import uvicorn

    sock = bind_socket(host, port)
    try:
        app, client = make_server(engine_kwargs, served_model_names, api_key, max_waiting, log_requests,
                                  tool_call_parser, enable_auto_tool_choice, max_request_body_bytes)
    except BaseException:
        sock.close()
        raise
    logger.info("serving %s on http://%s:%d (model loading in the background; /health is 503 until ready)",
                served_model_names[0], host, port)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level or log_level,
                                timeout_graceful_shutdown=UVICORN_GRACE_S,
                                access_log=False)  # the app logs access itself
        server = DrainingServer(config, client, shutdown_timeout)

        def stop_if_load_fails_or_engine_dies():
            if client.wait_ready():
                client.died.wait()
                logger.error("the engine died (%s): stopping the server", client.dead)
            server.should_exit = True

        threading.Thread(target=stop_if_load_fails_or_engine_dies, name="kimi-linear-engine-watch",
                         daemon=True).start()
        server.run(sockets=[sock])
    finally:
        client.shutdown()
        sock.close()
    if client.dead is not None and not client.ready.is_set():
        raise StartupError(client.dead)
    if client.died.is_set():
        raise EngineDiedError(f"the engine died while serving: {client.dead}")


def finished_request_metrics(out, t, now: float) -> dict:
    """`ServerMetrics.request_finished` fields of a finished RequestOutput: TTFT and end-to-end latency from the
    server's arrival time `t.arrival`, queue / prefill / decode / inference times from the engine's timestamps."""
    c0 = out.outputs[0] if out.outputs else None
    m = out.metrics

    def span(a, b):
        return b - a if a is not None and b is not None else None

    return dict(
        prompt_tokens=len(out.prompt_token_ids), generation_tokens=sum(len(c.token_ids) for c in out.outputs),
        finish_reason=(c0.finish_reason if c0 else None) or "abort",
        ttft=span(t.arrival, m.first_token_time if m is not None else t.first_token), itls=t.itls,
        e2e=now - t.arrival,
        queue_time=span(m.arrival_time, m.first_scheduled_time) if m is not None else None,
        prefill_time=span(m.first_scheduled_time, m.first_token_time) if m is not None else None,
        decode_time=span(m.first_token_time, m.last_token_time) if m is not None else None,
        inference_time=span(m.first_scheduled_time, m.last_token_time) if m is not None else None)


def startup_summary(desc: dict, served_model_names: list[str]) -> str:
    """The startup log block from `LLMEngine.describe()`: resolved config, model shape, dtype, cache capacity."""
    c, m, k = desc["config"], desc["model"], desc["cache"]
    kinds = ",".join(m["layer_types"])
    settings = " ".join(f"{key}={c[key]}" for key in sorted(c) if key != "model")
    lines = [
        f"engine ready: {c['model']} served as {', '.join(served_model_names)}",
        f"  model: {m['num_hidden_layers']} layers ({m['num_kda_layers']} KDA + {m['num_mla_layers']} MLA: {kinds}), "
        f"hidden {m['hidden_size']}, vocab {m['vocab_size']}, {m['num_experts']} experts (top-{m['num_experts_per_token']}"
        f", {m['num_shared_experts']} shared) in {m['num_moe_layers']} MoE layers",
        f"  dtype {c['dtype']} on {c['device']}; max_model_len {c['max_model_len']}, max_num_seqs {c['max_num_seqs']}",
        f"  cache: {k['tokens']} tokens ({k['num_blocks']} MLA blocks x {k['block_size']}), {k['num_state_slots']} KDA "
        f"state slots; {k['seqs_at_max_model_len']} sequences at max_model_len {c['max_model_len']}",
        f"  config: {settings}",
    ]
    return "\n".join(lines)
