"""Fixtures: one shared loopback server (tiny model with its tokenizer, CPU) and an openai client."""

from __future__ import annotations

import pytest
from loopback import openai_client, serving


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    yield from serving(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def oai(server):
    return openai_client(server)
