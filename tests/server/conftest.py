"""Fixtures: one shared loopback server (tiny model with its tokenizer, CPU) and an openai client."""

from __future__ import annotations

import pytest
from loopback import API_KEY, RunningServer


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    srv = RunningServer(str(tiny_checkpoint))
    srv.wait_healthy()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
