"""The OpenAPI document as the server behaves: request bodies of the routes that parse their own body
(`request_body.parse_body`), and the error statuses the server sends (400 in the OpenAI envelope where
FastAPI would document a 422 it never sends; 401 / 404 / 413 / 503 where they can happen).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kimi_linear.server.middleware import is_protected

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}}}},
}
_WHY = {"400": "Invalid request (OpenAI error envelope naming the field in `param`)",
        "401": "Missing or wrong API key", "404": "Unknown model",
        "413": "Request body over --max-request-body-bytes",
        "503": "Model loading, engine dead, overloaded or shutting down (with Retry-After)"}


def _error(code: str) -> dict:
    return {"description": _WHY[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]], api_key: bool) -> None:
    """Make `app.openapi()` document `bodies` (POST path -> request model) and the real error statuses."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        comps["ErrorResponse"] = _ERROR_SCHEMA
        for path, model in bodies.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                comps.setdefault(name, sub)
            comps[model.__name__] = js
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        for path, item in schema["paths"].items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                codes = []
                if method == "post" or path.startswith("/v1"):
                    codes += ["400", "404", "503"]
                if method == "post":
                    codes.append("413")
                if api_key and is_protected(path):
                    codes.append("401")
                if path == "/health":
                    codes.append("503")
                for code in codes:
                    responses.setdefault(code, _error(code))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
