"""Fixtures of the reliability tests: the tiny checkpoint (tests/conftest.py) served on loopback."""

from __future__ import annotations

import pytest
from harness import LoopbackServer


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """A server with an API key, a 1 MiB body limit and a 2048-token context, shared by a module's tests."""
    srv = LoopbackServer(str(tiny_checkpoint), max_request_body_bytes=1024 * 1024, max_model_len=2048)
    srv.wait_healthy()
    yield srv
    srv.stop()
