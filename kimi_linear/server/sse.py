"""Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]\n\n`.
Chunks are always UTF-8 encodable (`safe_text.dumps`), whatever strings they carry."""

from __future__ import annotations

from kimi_linear.server.safe_text import dumps

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {dumps(payload)}\n\n"
