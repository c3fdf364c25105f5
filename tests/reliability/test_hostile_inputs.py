"""The hostile-input table: each request gets its expected status, a 4xx comes in the OpenAI envelope,
nothing is ever a 5xx, and the server still answers afterwards (and holds no leftover request)."""

from __future__ import annotations

import json

import httpx
import pytest
from harness import AUTH, check_envelope

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
C, X = "/v1/chat/completions", "/v1/completions"
OK = (200,)
BAD = (400,)


def raw(text: str) -> bytes:
    """A JSON text with escapes json.dumps would not write (lone surrogates) sent as is."""
    return text.encode("ascii")


def deep(n: int) -> bytes:
    return b'{"model": "tiny", "max_tokens": 1, "prompt": ' + b"[" * n + b"]" * n + b"}"


# (id, method, path, body: dict | bytes | None, headers or None (= the API key), allowed statuses)
TABLE = [
    # --- the body itself
    ("malformed-json", "POST", C, b"{not json", None, BAD),
    ("empty-body", "POST", C, b"", None, BAD),
    ("json-array-body", "POST", C, b"[1, 2]", None, BAD),
    ("json-string-body", "POST", X, b'"hi"', None, BAD),
    ("invalid-utf8", "POST", X, b'{"model": "tiny", "prompt": "\xff\xfe"}', None, BAD),
    ("nan-literal", "POST", X, b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', None, BAD),
    ("infinity-literal", "POST", X, b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', None, BAD),
    ("nesting-100k", "POST", X, deep(100_000), None, BAD),
    ("nesting-900", "POST", X, deep(900), None, BAD),
    ("over-the-body-limit", "POST", X, {**COMP, "prompt": "z" * (1024 * 1024 + 10)}, None, (413,)),
    ("text-plain-content-type", "POST", X, json.dumps(COMP).encode(), {**AUTH, "content-type": "text/plain"}, OK),
    # --- strings that cannot be UTF-8 encoded, odd characters
    ("surrogate-model", "POST", X, raw('{"model": "\\udcff", "prompt": "hi"}'), None, (404,)),
    ("surrogate-prompt-echo", "POST", X, raw('{"prompt": "\\ud800x", "echo": true, "max_tokens": 1}'), None, OK),
    ("surrogate-chat-content", "POST", C, raw('{"messages": [{"role": "user", "content": "\\udfff"}], '
                                              '"max_tokens": 1}'), None, OK),
    ("surrogate-stop", "POST", X, raw('{"prompt": "hi", "stop": ["\\udcff"], "max_tokens": 2}'), None, OK),
    ("surrogate-detokenize-model", "POST", "/detokenize", raw('{"model": "\\udcff", "tokens": [3]}'), None, (404,)),
    ("nul-and-rtl", "POST", C, {**CHAT, "messages": [{"role": "user", "content": "\x00\u202e\ufeff\U0001f600"}]},
     None, OK),
    ("huge-model-name", "POST", X, {**COMP, "model": "m" * 200_000}, None, (404,)),
    # --- numbers out of range
    ("n-1e9", "POST", X, {**COMP, "n": 10**9}, None, BAD),
    ("max-tokens-1e30", "POST", X, {**COMP, "max_tokens": 10**30}, None, BAD),
    ("max-tokens-negative", "POST", X, {**COMP, "max_tokens": -1}, None, BAD),
    ("temperature-1e308", "POST", X, {**COMP, "temperature": 1e308}, None, BAD),
    ("temperature-nan-string", "POST", X, {**COMP, "temperature": "NaN"}, None, BAD),
    ("seed-2e80", "POST", X, {**COMP, "seed": 2**80}, None, (200, 400)),
    ("seed-negative", "POST", X, {**COMP, "seed": -7}, None, OK),
    ("top-k-1e12", "POST", X, {**COMP, "top_k": 10**12}, None, (200, 400)),
    ("logit-bias-huge-key", "POST", X, {**COMP, "logit_bias": {"99999999999999999999": 1}}, None, BAD),
    ("logit-bias-10k-keys", "POST", X, {**COMP, "logit_bias": {str(i): 1 for i in range(10_000)}}, None, (200, 400)),
    ("stop-token-ids-1e20", "POST", X, {**COMP, "stop_token_ids": [10**20]}, None, BAD),
    ("allowed-token-ids-1e9", "POST", X, {**COMP, "allowed_token_ids": [10**9]}, None, BAD),
    ("prompt-logprobs-1e6", "POST", X, {**COMP, "prompt_logprobs": 10**6}, None, BAD),
    ("min-tokens-over-max", "POST", X, {**COMP, "min_tokens": 50}, None, BAD),
    ("seed-string", "POST", X, {**COMP, "seed": "abc"}, None, BAD),
    # --- prompts of the wrong shape
    ("prompt-id-1e30", "POST", X, {**COMP, "prompt": [10**30]}, None, BAD),
    ("prompt-id-negative", "POST", X, {**COMP, "prompt": [3, -1]}, None, BAD),
    ("prompt-mixed-list", "POST", X, {**COMP, "prompt": [1, "a"]}, None, BAD),
    ("prompt-ragged-ids", "POST", X, {**COMP, "prompt": [[1, 2], [3, "x"]]}, None, BAD),
    ("prompt-bool", "POST", X, {**COMP, "prompt": True}, None, BAD),
    ("prompt-bool-ids", "POST", X, {**COMP, "prompt": [True, False]}, None, BAD),
    ("prompt-object", "POST", X, {**COMP, "prompt": {"a": 1}}, None, BAD),
    ("echo-with-stream", "POST", X, {**COMP, "echo": True, "stream": True}, None, BAD),
    # --- chat messages, tools, templates
    ("messages-not-a-list", "POST", C, {**CHAT, "messages": "hi"}, None, BAD),
    ("message-image-part", "POST", C, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None, BAD),
    ("message-no-content", "POST", C, {**CHAT, "messages": [{"role": "user"}]}, None, BAD),
    ("tools-a-string", "POST", C, {**CHAT, "tools": "x"}, None, BAD),
    ("tools-ints", "POST", C, {**CHAT, "tools": [1, 2]}, None, BAD),
    ("template-include", "POST", C, {**CHAT, "chat_template": "{% include 'x' %}"}, None, BAD),
    ("template-extends", "POST", C, {**CHAT, "chat_template": "{% extends 'base' %}"}, None, BAD),
    ("template-import", "POST", C, {**CHAT, "chat_template": "{% import 'm' as m %}{{ m.x }}"}, None, BAD),
    ("template-1e12-chars", "POST", C, {**CHAT, "chat_template": "{{ 'a' * 10**12 }}"}, None, BAD),
    ("template-format-width", "POST", C, {**CHAT, "chat_template": "{{ '%999999999d' % 1 }}"}, None, BAD),
    ("template-recursion", "POST", C, {**CHAT, "chat_template":
                                       "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"}, None, BAD),
    ("template-syntax", "POST", C, {**CHAT, "chat_template": "{% for %}"}, None, BAD),
    ("template-dunder", "POST", C, {**CHAT, "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
     None, BAD),
    ("template-kwargs-reserved", "POST", C, {**CHAT, "chat_template_kwargs": {"messages": 1}}, None, BAD),
    ("template-kwargs-not-object", "POST", C, {**CHAT, "chat_template_kwargs": "x"}, None, BAD),
    # --- structured output
    ("json-schema-bad-ref", "POST", C, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, None, BAD),
    ("regex-unbalanced", "POST", X, {**COMP, "structured_outputs": {"regex": "(a|"}}, None, BAD),
    ("grammar-garbage", "POST", X, {**COMP, "structured_outputs": {"grammar": "root ::= ("}}, None, BAD),
    ("structured-unknown-key", "POST", X, {**COMP, "structured_outputs": {"nope": 1}}, None, BAD),
    # --- routes, methods, auth
    ("unknown-route", "GET", "/v1/nothing", None, None, (404,)),
    ("get-on-post-route", "GET", C, None, None, (405,)),
    ("put-on-health", "PUT", "/health", None, None, (405,)),
    ("wrong-api-key", "POST", X, COMP, {"Authorization": "Bearer nope"}, (401,)),
    ("no-api-key", "POST", "/tokenize", {"prompt": "hi"}, {}, (401,)),
    ("basic-auth-scheme", "POST", X, COMP, {"Authorization": "Basic dGVzdC1rZXk="}, (401,)),
    ("detokenize-1e30", "POST", "/detokenize", {"tokens": [10**30]}, None, BAD),
    ("tokenize-prompt-and-messages", "POST", "/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, None, BAD),
]


def send(server, method: str, path: str, body, headers) -> httpx.Response:
    headers = dict(AUTH if headers is None else headers)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if body is not None:
        headers.setdefault("content-type", "application/json")
    return httpx.request(method, server.url + path, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("name,method,path,body,headers,allowed", TABLE, ids=[row[0] for row in TABLE])
def test_hostile_input(server, name, method, path, body, headers, allowed):
    r = send(server, method, path, body, headers)
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.status_code in allowed, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        check_envelope(r, r.status_code)
    else:
        json.loads(r.text)  # a complete JSON answer
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.engine_idle(timeout=30)
