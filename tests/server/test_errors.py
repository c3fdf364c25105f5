"""Every client mistake gets the OpenAI envelope with the right status (never a 500); a client that
disconnects mid-stream aborts its request and frees its cache; a full queue answers 503."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from loopback import RunningServer

H = {"Authorization": "Bearer test-key"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


def check(r: httpx.Response, status: int, param: str | None = "ANY"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "ANY":
        assert err["param"] == param, err
    return err


BAD = [
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
     "structured_outputs"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMP, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": [1, 99999]}, "prompt_token_ids"),
    ("/v1/completions", {**COMP, "prompt": "x " * 600}, "prompt"),
    ("/v1/completions", {**COMP, "suffix": "tail"}, "suffix"),
    ("/v1/completions", {**COMP, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMP, "min_tokens": 10}, "min_tokens"),
    ("/v1/completions", {**COMP, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{k}" for k, (p, _, _) in enumerate(BAD)])
def test_invalid_fields_are_400(server, path, body, param):
    check(httpx.post(server.url + path, json=body, headers=H, timeout=60), 400, param)


def test_context_overflow_message(server):
    r = httpx.post(server.url + "/v1/completions", json={**COMP, "max_tokens": 600}, headers=H)
    err = check(r, 400)
    assert "maximum context length is 512 tokens" in err["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={**H, "content-type":
                                                                                        "application/json"})
    check(r, 400)


def test_unknown_model_is_404(server):
    err = check(httpx.post(server.url + "/v1/completions", json={**COMP, "model": "gpt-5"}, headers=H), 404)
    assert "gpt-5" in err["message"]


def test_wrong_or_missing_key_is_401(server):
    check(httpx.post(server.url + "/v1/completions", json=COMP, headers={"Authorization": "Bearer nope"}), 401)
    check(httpx.post(server.url + "/v1/completions", json=COMP), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_unknown_route_is_404_envelope(server):
    check(httpx.get(server.url + "/v1/nothing", headers=H), 404)


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"model": "tiny", "prompt": [3, 4, 5, 6], "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    assert server.engine_idle()
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers=H) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got >= 3:
                    break  # leave mid-stream: the response is closed here
    assert server.engine_idle(), server.client.engine.stats()


def test_disconnect_non_streaming_frees_the_request(server):
    body = {"model": "tiny", "prompt": [3, 4, 5, 6], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=H, timeout=1.5)
    assert server.engine_idle(timeout=30)


def test_full_queue_is_503(tiny_checkpoint):
    srv = RunningServer(str(tiny_checkpoint), api_key=None, max_waiting=0, max_num_seqs=1)
    try:
        srv.wait_healthy()
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True}
        results = []

        def call():
            results.append(httpx.post(srv.url + "/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and 503 in codes, codes
        for r in results:
            if r.status_code == 503:
                check(r, 503)
        assert srv.engine_idle()
    finally:
        srv.stop()


def test_bad_config_fails_before_serving(tmp_path):
    from kimi_linear.errors import ConfigError

    (tmp_path / "config.json").write_text('{"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear"}')
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        RunningServer(str(tmp_path), api_key=None)


def test_health_503_when_the_weights_cannot_load(tiny_checkpoint, tmp_path):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    shard = next((tmp_path / "m").glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    srv = RunningServer(str(tmp_path / "m"), api_key=None)
    try:
        deadline = time.time() + 60
        while srv.client.dead is None and time.time() < deadline:
            time.sleep(0.05)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and shard.name in h.json()["error"]["message"]
        check(httpx.post(srv.url + "/v1/completions", json={**COMP, "prompt": [1, 2]}), 503)
    finally:
        srv.stop()


def test_health_503_after_engine_death(tiny_checkpoint):
    srv = RunningServer(str(tiny_checkpoint), api_key=None)
    try:
        srv.wait_healthy()

        def broken_step():
            raise RuntimeError("simulated device failure")

        srv.client.engine.step = broken_step
        r = httpx.post(srv.url + "/v1/completions", json={**COMP, "prompt": [1, 2]}, timeout=60)
        check(r, 503)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "simulated device failure" in h.json()["error"]["message"]
        check(httpx.post(srv.url + "/v1/completions", json={**COMP, "prompt": [1, 2]}), 503)
    finally:
        srv.stop()
