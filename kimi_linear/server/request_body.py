"""Request bodies decoded and validated off the event loop, without long holds of the GIL.

FastAPI decodes and validates a body on the event loop: a 16 MB token-id body froze every other
request (/health included) for seconds. `parse_body` reads the body (the middleware bounds its size),
then decodes the JSON and validates the pydantic model in a worker thread. A worker thread alone is
not enough: `json.loads` is one C call that holds the GIL for the whole body (half a second for 16 MB
of token ids), so numbers and objects are built by small Python hooks, between which the interpreter
hands the GIL to the event loop (a few milliseconds at most).

Every failure is a 400: invalid UTF-8, invalid JSON, NaN / Infinity (not JSON, and never a valid
sampling value), nesting deeper than the interpreter's recursion limit, and pydantic's field errors (re-raised as
FastAPI's RequestValidationError so the app's handler names the field as before).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from kimi_linear.errors import ValidationError

def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _object(pairs: list) -> dict:
    return dict(pairs)


_DECODER = json.JSONDecoder(parse_int=_int, parse_float=_float, parse_constant=_no_constant,
                            object_pairs_hook=_object)


def decode_json(body: bytes) -> Any:
    """The JSON value of `body`. Raises ValidationError (400) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(f"the request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ValidationError("the request body is empty; send a JSON object")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise ValidationError(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except RecursionError:
        raise ValidationError("the request body nests arrays / objects too deeply") from None
    except ValueError as e:
        raise ValidationError(f"the request body is not valid JSON: {e}") from None


def validate_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    value = decode_json(body)
    if not isinstance(value, dict):
        raise ValidationError(f"the request body must be a JSON object, got a JSON {type(value).__name__}")
    try:
        return model.model_validate(value)
    except PydanticValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


async def parse_body(raw: Request, model: type[BaseModel]) -> BaseModel:
    """The request's body as `model`, decoded and validated in a worker thread."""
    body = await raw.body()
    return await asyncio.to_thread(validate_body, body, model)
