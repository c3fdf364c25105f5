"""A failed engine step while serving: the request in flight ends with a 503 in the error envelope, then
`serve` stops and raises EngineDiedError (the CLI exits non-zero), as vLLM does, instead of listening on and
answering 503 forever with frozen gauges."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from harness import free_port, wait_for_health

from kimi_linear.engine.llm_engine import LLMEngine


def test_serve_exits_when_a_step_fails(tiny_checkpoint, monkeypatch):
    from kimi_linear.server.launch import EngineDiedError, serve

    real_step, calls = LLMEngine.step, []

    def failing_step(self):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "step", failing_step)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answers: dict[str, object] = {}

    def client():
        wait_for_health(url, timeout=60)
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        answers["plain"] = (r.status_code, r.json())

    t = threading.Thread(target=client, daemon=True)
    t.start()
    # Without the fix serve would listen on forever: interrupt it after a while, so the test fails instead.
    guard = threading.Timer(90, lambda: os.kill(os.getpid(), signal.SIGINT))
    guard.start()
    try:
        with pytest.raises(EngineDiedError, match="illegal memory access"):
            serve(dict(model=str(tiny_checkpoint), device="cpu", max_model_len=256), ["tiny"], port=port,
                  log_level="warning", uvicorn_log_level="error")
    finally:
        guard.cancel()
    t.join(timeout=30)
    status, body = answers["plain"]
    assert status == 503 and "engine died" in body["error"]["message"], (status, body)
    with pytest.raises(httpx.TransportError):  # nothing listens any more
        httpx.get(url + "/health", timeout=2)
