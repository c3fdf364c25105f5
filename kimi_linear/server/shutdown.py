"""Graceful shutdown: on SIGTERM / SIGINT the server drains the requests in flight, then exits 0.

`DrainingServer` is uvicorn's Server with a drain step before uvicorn's own shutdown:
1. stop accepting connections, and answer new requests on open connections 503 (`begin_drain`);
2. wait up to `drain_timeout` seconds for the requests in flight to finish (a second Ctrl-C skips it);
3. end the rest with an error (`cut_all`): a stream gets an error event and `data: [DONE]`, a
   non-streaming request a 503 in the OpenAI envelope, and the engine frees their caches;
4. uvicorn closes the connections (they have all finished) and the lifespan.

Without it uvicorn waited 5 s and then cancelled the handlers: streams stopped with no final event
and every cancelled task logged a CancelledError traceback. A signal that was handled this way is not
raised again after the drain, so the process exits normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from kimi_linear.server.engine_client import AsyncEngineClient

logger = logging.getLogger(__name__)

UVICORN_GRACE_S = 5  # after the drain: how long uvicorn waits for the (ended) responses to be sent


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: AsyncEngineClient, drain_timeout: float):
        super().__init__(config)
        self.client = client
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # no new connections from now on
        self.client.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        if self.client.num_in_flight:
            logger.info("shutting down: waiting up to %g s for %d request(s) in flight", self.drain_timeout,
                        self.client.num_in_flight)
        while self.client.num_in_flight and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.client.num_in_flight:
            n = self.client.cut_all(f"the server is shutting down: the request did not finish within the "
                                    f"shutdown timeout ({self.drain_timeout:g} s)")
            logger.warning("shutting down: ended %d unfinished request(s) with an error", n)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # handled by the drain: exit normally, do not re-raise
