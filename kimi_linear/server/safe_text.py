"""Responses that survive any string a client sent, and messages safe to show to anyone.

JSON allows a lone surrogate (`"\\udcff"`), Python keeps it in the str, and UTF-8 cannot encode it:
Starlette's JSONResponse (and an SSE chunk) would raise UnicodeEncodeError while building the answer,
a 500 for the client's own input. Here such a payload falls back to ASCII-escaped JSON (`\\udcff`
again, which every JSON parser reads back); the common case stays the fast non-ASCII encoding.

`int_list_json` writes a long token-id list in slices (each a short C call), so that encoding it never
holds the GIL for long. `redact_paths` turns absolute file paths into their last component, for
messages that unauthenticated routes (`/health`) show.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse


def dumps(payload: Any) -> str:
    """Compact JSON text that is always encodable as UTF-8."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything non-ASCII
        text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text


class SafeJSONResponse(JSONResponse):
    """JSONResponse whose body never fails to encode (see the module docstring)."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def int_list_json(ids: list[int], slice_len: int = 65536) -> str:
    """`json.dumps(ids)` (compact), built slice by slice."""
    return "[" + ",".join([",".join(map(str, ids[i:i + slice_len])) for i in range(0, len(ids), slice_len)]) + "]"


_ABS_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def redact_paths(message: str) -> str:
    """`message` with every absolute path `/a/b/c.ext` shortened to `c.ext`."""
    return _ABS_PATH.sub(lambda m: m.group(1), message)
