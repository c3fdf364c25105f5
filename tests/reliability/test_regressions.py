"""Regression tests of issue 16, items 1-7 (item 8, the KDA path of mixed batches, lives in layers/kda.py):
each failed on the server as it was before the fix."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from harness import AUTH, LoopbackServer, check_envelope, free_port

COMP = {"model": "tiny", "prompt": [3, 4, 5, 6], "max_tokens": 4}


def post_raw(server, path: str, text: str, headers=AUTH, timeout: float = 60) -> httpx.Response:
    """POST a JSON text as is (it may hold escapes, like a lone surrogate, that httpx's json= cannot send)."""
    return httpx.post(server.url + path, content=text.encode("ascii"),
                      headers={**headers, "content-type": "application/json"}, timeout=timeout)


# --------------------------------------------------------------------------- 1. disconnects
def test_non_streaming_client_that_times_out_is_aborted(server):
    """The API-key middleware hid the disconnect: the request ran to max_tokens after its client left."""
    assert server.engine_idle()
    before = server.client.engine.stats().num_generated_tokens
    body = {**COMP, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=1.0)
    assert server.engine_idle(timeout=20)
    generated = server.client.engine.stats().num_generated_tokens - before
    assert generated < 2000, f"the request ran to its end ({generated} tokens) after its client left"


# --------------------------------------------------------------------------- 2. admission
def test_overload_is_a_503_with_retry_after_before_any_stream_starts(tiny_checkpoint):
    """Streams passed the capacity check, got a 200, then an error event; 503s had no Retry-After."""
    srv = LoopbackServer(str(tiny_checkpoint), api_key=None, max_waiting=0, max_num_seqs=1, max_model_len=2048)
    try:
        srv.wait_healthy()
        body = {**COMP, "max_tokens": 30, "ignore_eos": True, "stream": True}
        barrier = threading.Barrier(4)
        results = []

        def call():
            barrier.wait()
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
                results.append((r.status_code, r.headers.get("retry-after"), r.read().decode()))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(s for s, _, _ in results)
        assert statuses.count(200) >= 1 and 503 in statuses, statuses
        for status, retry_after, text in results:
            if status == 200:
                assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
            else:
                assert status == 503 and retry_after is not None and int(retry_after) >= 1
                assert json.loads(text)["error"]["type"] == "service_unavailable"
        # a non-streaming request while the only place is taken: 503 with Retry-After too
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "max_tokens": 2000}, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            next(lines)
            late = httpx.post(srv.url + "/v1/completions", json={**COMP, "max_tokens": 2}, timeout=60)
            check_envelope(late, 503)
            assert late.headers.get("retry-after") is not None
        assert srv.engine_idle()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 3. 500s for client input
def test_lone_surrogate_in_model_is_a_404(server):
    err = check_envelope(post_raw(server, "/v1/completions", '{"model": "\\udcff", "prompt": "hi", "max_tokens": 1}'),
                         404)
    assert "\udcff" in err["message"]


def test_lone_surrogate_in_an_echoed_prompt_is_answered(server):
    r = post_raw(server, "/v1/completions", '{"model": "tiny", "prompt": "a\\udcffb", "echo": true, "max_tokens": 2}')
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("a\udcffb")


@pytest.mark.parametrize("template", ["{% include 'other.jinja' %}", "{{ 'a' * 10**12 }}",
                                      "{{ messages[0].content | center(10**11) }}"],
                         ids=["include", "huge-repeat", "huge-filter-width"])
def test_bad_request_chat_template_is_a_400(server, template):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": template}
    err = check_envelope(httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60), 400)
    assert err["param"] == "chat_template"


def test_endless_chat_template_is_stopped(server, monkeypatch):
    from kimi_linear.loader import template_limits

    monkeypatch.setattr(template_limits, "RENDER_TIMEOUT_S", 1.0)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": loop}
    t0 = time.time()
    err = check_envelope(httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60), 400)
    assert "longer than 1 s" in err["message"] and time.time() - t0 < 10


# --------------------------------------------------------------------------- 4. big input
def test_body_over_the_limit_is_a_413(server):
    big = {"model": "tiny", "prompt": "x" * (2 * 1024 * 1024), "max_tokens": 1}
    err = check_envelope(httpx.post(server.url + "/v1/completions", json=big, headers=AUTH, timeout=60), 413)
    assert "--max-request-body-bytes" in err["message"]

    def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(server.url + "/tokenize", content=chunks(), headers={**AUTH, "content-type": "application/json"},
                   timeout=60)
    check_envelope(r, 413)
    assert httpx.get(server.url + "/health").status_code == 200


# --------------------------------------------------------------------------- 5. non-finite logits
def _nan_logits(engine, monkeypatch):
    model = engine.runner.model
    real = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda hidden: torch.full_like(real(hidden), float("nan")))


def test_non_finite_logits_finish_the_request_with_an_error(server, monkeypatch):
    _nan_logits(server.client.engine, monkeypatch)
    err = check_envelope(httpx.post(server.url + "/v1/completions", json=COMP, headers=AUTH, timeout=60), 500)
    assert "non-finite" in err["message"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "non-finite" in json.loads(events[-2])["error"]["message"], events[-3:]
    monkeypatch.undo()
    assert server.engine_idle()
    assert httpx.post(server.url + "/v1/completions", json=COMP, headers=AUTH, timeout=60).status_code == 200


def test_non_finite_logits_offline_finish_reason_is_error(tiny_checkpoint, monkeypatch):
    from kimi_linear import LLM, SamplingParams

    llm = LLM(str(tiny_checkpoint), device="cpu", max_model_len=128)
    _nan_logits(llm.llm_engine, monkeypatch)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert out.finish_reason == "error" and out.token_ids == [], out


# --------------------------------------------------------------------------- 6. port clash
def test_a_bound_port_keeps_a_second_server_off():
    from kimi_linear.server.launch import BindError, bind_socket

    port = free_port()
    first = bind_socket("127.0.0.1", port)
    try:
        with pytest.raises(BindError, match="Is another server using the port"):
            bind_socket("127.0.0.1", port).close()
    finally:
        first.close()


# --------------------------------------------------------------------------- 7. smaller
def test_405_has_allow_and_a_client_error_type(server):
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    err = check_envelope(r, 405)
    assert "POST" in r.headers["allow"] and err["type"] == "invalid_request_error"


def test_health_200_is_json(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")


def test_openapi_documents_400_not_422(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    codes = {code for item in doc["paths"].values() for op in item.values() for code in op.get("responses", {})}
    assert "422" not in codes
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "400" in chat["responses"] and "413" in chat["responses"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [3, 4]})])
def test_tokenizer_routes_need_the_api_key(server, path, body):
    check_envelope(httpx.post(server.url + path, json=body), 401)
    assert httpx.post(server.url + path, json=body, headers=AUTH).status_code == 200
