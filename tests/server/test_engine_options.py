"""Engine options as the server sees them: generation_config.json defaults (max_new_tokens no longer
collides with the request's max_tokens), --max-logprobs, --chat-template, --generation-config,
request logging, and the engine's stats() snapshot behind /metrics."""

from __future__ import annotations

import json
import logging
import shutil

import httpx
import pytest
from loopback import RunningServer

from kimi_linear.server.protocol import ChatCompletionRequest, CompletionRequest

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
COMP = {"model": "tiny", "prompt": [1, 2, 3], "temperature": 0, "ignore_eos": True}


def with_generation_config(src, dst, **fields):
    """A copy of checkpoint `src` whose generation_config.json also holds `fields`."""
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update(fields)
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


@pytest.fixture(scope="module")
def opt_server(tiny_checkpoint, tmp_path_factory):
    """The tiny model whose generation_config.json sets max_new_tokens = 3, served with max_logprobs 2,
    a chat template override and request logging."""
    folder = with_generation_config(tiny_checkpoint, tmp_path_factory.mktemp("gen") / "m", max_new_tokens=3)
    srv = RunningServer(str(folder), api_key=None, log_requests=True, max_logprobs=2, chat_template=TEMPLATE)
    srv.wait_healthy()
    yield srv
    srv.stop()


def usage(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return r.json()["usage"]["completion_tokens"]


# ---------------------------------------------------------------- generation_config.json max_new_tokens
def test_max_new_tokens_default_does_not_collide_with_max_tokens():
    """Regression: defaults holding max_tokens made SamplingParams() get max_tokens twice (every request 500)."""
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert chat.to_sampling_params({"max_tokens": 3}).max_tokens == 3
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=5) \
        .to_sampling_params({"max_tokens": 3}).max_tokens == 5
    assert CompletionRequest(prompt="x").to_sampling_params({"max_tokens": 3}).max_tokens == 3
    assert CompletionRequest(prompt="x").to_sampling_params({}).max_tokens == 16  # OpenAI's default
    assert CompletionRequest(prompt="x", max_tokens=7).to_sampling_params({"max_tokens": 3}).max_tokens == 7


def test_server_uses_max_new_tokens_when_the_request_has_none(opt_server):
    url = opt_server.url
    assert usage(httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)) == 3
    assert usage(httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 5}, timeout=60)) == 5
    assert usage(httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_completion_tokens": 4},
                            timeout=60)) == 4
    assert usage(httpx.post(url + "/v1/completions", json=COMP, timeout=60)) == 3
    assert usage(httpx.post(url + "/v1/completions", json={**COMP, "max_tokens": 6}, timeout=60)) == 6


def test_generation_config_vllm_ignores_the_defaults(tiny_checkpoint, tmp_path):
    folder = with_generation_config(tiny_checkpoint, tmp_path / "m", max_new_tokens=3)
    srv = RunningServer(str(folder), api_key=None, generation_config="vllm")
    try:
        srv.wait_healthy()
        assert usage(httpx.post(srv.url + "/v1/completions", json=COMP, timeout=60)) == 16
        assert srv.client.engine.sampling_defaults == {}
    finally:
        srv.stop()


# ---------------------------------------------------------------- --max-logprobs
def test_max_logprobs_is_enforced_naming_the_field(opt_server):
    url = opt_server.url
    r = httpx.post(url + "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    r = httpx.post(url + "/v1/completions", json={**COMP, "logprobs": 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert "max_logprobs" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**COMP, "prompt_logprobs": 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    r = httpx.post(url + "/v1/completions", json={**COMP, "logprobs": 2, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2


# ---------------------------------------------------------------- --chat-template
def test_chat_template_override(opt_server):
    r = httpx.post(opt_server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    text = httpx.post(opt_server.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text == "<<hi>>"


# ---------------------------------------------------------------- request logging, stats
def test_requests_are_logged_when_enabled(opt_server, caplog):
    with caplog.at_level(logging.INFO, logger="kimi_linear.server.serving"):
        usage(httpx.post(opt_server.url + "/v1/completions", json=COMP, timeout=60))
    assert any(r.getMessage().startswith("request cmpl-") and "3 prompt tokens" in r.getMessage()
               for r in caplog.records)


def test_no_request_logging_by_default(server, caplog):
    with caplog.at_level(logging.INFO, logger="kimi_linear.server.serving"):
        httpx.post(server.url + "/v1/completions", json={**COMP, "max_tokens": 2},
                   headers={"Authorization": "Bearer test-key"}, timeout=60)
    assert not [r for r in caplog.records if r.name == "kimi_linear.server.serving"]


def test_stats_snapshot(opt_server):
    usage(httpx.post(opt_server.url + "/v1/completions", json={**COMP, "max_tokens": 2}, timeout=60))
    assert opt_server.engine_idle()
    s = opt_server.client.stats()
    assert s.num_running == s.num_waiting == s.num_blocks_used == s.num_slots_used == 0
    assert s.num_blocks > 0 and s.num_slots > 0 and s.kv_cache_usage == 0.0
    assert s.num_generated_tokens >= 2 and s.num_scheduled_tokens >= 3 + 1 and s.num_steps >= 2
    metrics = httpx.get(opt_server.url + "/metrics").text
    assert 'kimi_linear:num_requests_running{model_name="tiny"} 0.0' in metrics
