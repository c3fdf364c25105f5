"""The streamed response of admitted requests: their places are taken before the 200 goes out.

A handler that streams calls `AsyncEngineClient.admit(request_ids)` before it returns the response, so
an overloaded (or shutting-down) server answers 503 with Retry-After instead of a 200 followed by an
error event (which the openai client never retries). `AdmittedStreamingResponse` gives the places back
when the response ends, also when it never started (the client left first): `generate` has taken over
the places it used, `release` frees the rest.
"""

from __future__ import annotations

from fastapi.responses import StreamingResponse

from kimi_linear.server.engine_client import AsyncEngineClient


class AdmittedStreamingResponse(StreamingResponse):
    def __init__(self, content, client: AsyncEngineClient, request_ids: list[str], **kwargs):
        super().__init__(content, **kwargs)
        self._client = client
        self._request_ids = list(request_ids)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._client.release(self._request_ids)


def admitted_stream(client: AsyncEngineClient, request_ids: list[str], content) -> AdmittedStreamingResponse:
    """Admit `request_ids` now (raises OverloadedError / EngineDeadError: a 503 before anything is sent) and
    return the SSE response streaming `content`."""
    client.admit(request_ids)
    return AdmittedStreamingResponse(content, client, request_ids, media_type="text/event-stream")
