"""Start the server: build the engine client (the model loads in the engine thread), the metrics and
the app, then run uvicorn. /health answers 503 until the model is ready."""

from __future__ import annotations

import logging

from kimi_linear.server.api_server import ServerSettings, build_app
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def make_server(engine_kwargs: dict, served_model_names: list[str], api_key: str | None = None,
                max_waiting: int = 4096):
    """(app, client): the FastAPI app and its started engine client (loading in the background)."""
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.engine.llm_engine import LLMEngine

    from kimi_linear.config import ModelConfig

    # Invalid flags or a bad config.json fail here, before the server starts; weight-loading failures
    # happen in the engine thread and show as a dead engine (/health 503 with the reason).
    config = EngineConfig.from_kwargs(**engine_kwargs)
    ModelConfig.from_pretrained(config.model)
    metrics = ServerMetrics(served_model_names[0])

    def on_finished(out, t):
        c0 = out.outputs[0] if out.outputs else None
        metrics.request_finished(
            prompt_tokens=len(out.prompt_token_ids),
            generation_tokens=sum(len(c.token_ids) for c in out.outputs),
            finish_reason=(c0.finish_reason if c0 else None) or "abort",
            ttft=(t.first_token - t.arrival) if t.first_token else None, itls=t.itls,
            e2e=(t.last_token or t.arrival) - t.arrival, queue_time=None)

    client = AsyncEngineClient(lambda: LLMEngine(config), max_waiting=max_waiting, on_finished=on_finished)
    metrics._stats = client.stats
    app = build_app(client, ServerSettings(served_model_names, api_key), metrics)
    client.start()
    return app, client


def serve(engine_kwargs: dict, served_model_names: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_waiting: int = 4096, log_level: str = "info") -> None:
    import uvicorn

    app, client = make_server(engine_kwargs, served_model_names, api_key, max_waiting)
    logger.info("serving %s on http://%s:%d (model loading in the background; /health is 503 until ready)",
                served_model_names[0], host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        client.shutdown()
