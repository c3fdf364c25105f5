"""Observability: the startup log block, request ids (X-Request-Id in and out, in the access and request
logs), and the Prometheus metrics the engine feeds per step (token counters) and per request (queue,
prefill, decode times), through a real loopback server and the official `openai` client."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
from loopback import API_KEY, RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def logged(tiny_checkpoint):
    """A server with request logging on, and every INFO line the server package logged since before it started."""
    rec = _Records()
    log = logging.getLogger("kimi_linear.server")
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(rec)
    srv = RunningServer(str(tiny_checkpoint), log_requests=True)
    srv.wait_healthy()
    yield srv, rec
    srv.stop()
    log.removeHandler(rec)
    log.setLevel(old)


@pytest.fixture(scope="module")
def client(logged):
    import openai

    return openai.OpenAI(base_url=logged[0].url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{model_name="tiny"\}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_startup_block_names_config_shape_and_capacity(logged):
    srv, rec = logged
    blocks = [ln for ln in rec.lines if ln.startswith("engine ready:")]
    assert len(blocks) == 1, rec.lines
    block = blocks[0]
    desc = srv.client.engine.describe()
    assert "4 layers (3 KDA + 1 MLA: kda,kda,kda,mla), hidden 64" in block
    assert f"{desc['model']['num_experts']} experts (top-{desc['model']['num_experts_per_token']}" in block
    assert "dtype bfloat16 on cpu; max_model_len 512, max_num_seqs 8" in block
    k = desc["cache"]
    assert k["tokens"] == k["num_blocks"] * k["block_size"] and k["seqs_at_max_model_len"] == min(
        k["num_state_slots"], k["tokens"] // 512)
    assert f"cache: {k['tokens']} tokens ({k['num_blocks']} MLA blocks x 64), {k['num_state_slots']} KDA state " \
           f"slots; {k['seqs_at_max_model_len']} sequences at max_model_len 512" in block
    assert "max_num_batched_tokens=256" in block and "block_size=64" in block


def test_incoming_request_id_is_honoured(client, logged):
    srv, rec = logged
    raw = client.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=2,
                                                      extra_headers={"X-Request-Id": "job-42"})
    assert raw.headers["x-request-id"] == "job-42"
    assert raw.parse().id == "cmpl-job-42"
    chat = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "job-43"})
    assert chat.headers["x-request-id"] == "job-43" and chat.parse().id == "chatcmpl-job-43"
    assert any("request cmpl-job-42-0: " in ln for ln in rec.lines)  # the request log
    assert any(ln.startswith("request cmpl-job-42-0 finished: ") for ln in rec.lines)
    assert any('"POST /v1/completions" 200 request_id=job-42 ' in ln for ln in rec.lines)  # the access log


def test_generated_request_id_is_in_the_header_and_logs(client, logged):
    srv, rec = logged
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=2)
    rid = raw.parse().id
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", rid) and raw.headers["x-request-id"] == rid
    # the access log line is written once the response has gone out: the client may see the body first
    deadline = time.monotonic() + 5.0
    while not any(f"request_id={rid} " in ln for ln in rec.lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(f"request_id={rid} " in ln for ln in rec.lines)
    r = httpx.get(srv.url + "/health")  # other routes get an id too
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_request_id_in_flight_is_a_400(logged):
    srv, _ = logged
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
    headers = {**AUTH, "X-Request-Id": "twice"}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=headers, timeout=60) as first:
        lines = first.iter_lines()  # kept alive: a dropped iterator closes the connection (an abort)
        assert next(lines).startswith('data: {"id":"cmpl-twice"')
        again = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=60)
    assert again.status_code == 400
    assert again.json()["error"]["param"] == "X-Request-Id" and "twice" in again.json()["error"]["message"]
    too_long = httpx.post(srv.url + "/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "x" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "X-Request-Id"
    assert srv.engine_idle()


def test_token_counters_move_every_step(logged):
    """generation_tokens grows while a streamed request is still running (counted per step, not at finish)."""
    srv, _ = logged
    before = httpx.get(srv.url + "/metrics").text
    g0, p0 = _metric(before, "kimi_linear:generation_tokens_total"), _metric(before, "kimi_linear:prompt_tokens_total")
    body = {"model": "tiny", "prompt": list(range(5, 25)), "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        while seen < 6:
            if next(lines).startswith("data: {"):
                seen += 1
        mid = httpx.get(srv.url + "/metrics").text
    assert _metric(mid, "kimi_linear:prompt_tokens_total") >= p0 + 20
    assert _metric(mid, "kimi_linear:generation_tokens_total") >= g0 + 6
    assert srv.engine_idle()
    assert _metric(mid, "kimi_linear:iteration_tokens_total_count") >= 6


def test_request_time_histograms_are_filled(client, logged):
    srv, _ = logged
    text0 = httpx.get(srv.url + "/metrics").text
    names = ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
             "request_inference_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
             "request_time_per_output_token_seconds")
    counts0 = {n: _metric(text0, f"kimi_linear:{n}_count") for n in names}
    client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, extra_body={"ignore_eos": True})
    text = httpx.get(srv.url + "/metrics").text
    for n in names:
        assert _metric(text, f"kimi_linear:{n}_count") == counts0[n] + 1, n
    assert _metric(text, "kimi_linear:request_decode_time_seconds_sum") > _metric(
        text0, "kimi_linear:request_decode_time_seconds_sum")
    assert _metric(text, "kimi_linear:request_prefill_time_seconds_sum") > 0
    assert re.search(r'^kimi_linear:request_success_total\{finished_reason="length",model_name="tiny"\} ', text, re.M)


def test_engine_counts_prompt_tokens_per_chunk(tiny_checkpoint):
    """The engine's prompt-token counter grows with every prefill chunk, before the first token exists."""
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.engine.llm_engine import LLMEngine
    from kimi_linear.sampling_params import SamplingParams

    for overlap in (False, True):
        eng = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_checkpoint), device="cpu", max_model_len=128,
                                                 max_num_seqs=2, max_num_batched_tokens=16,
                                                 async_scheduling=overlap))
        eng.add_request("a", {"prompt_token_ids": list(range(3, 43))}, SamplingParams(max_tokens=2, ignore_eos=True))
        seen = []
        while eng.has_unfinished_requests():
            outs = eng.step()
            s = eng.stats()
            seen.append((s.num_prompt_tokens, s.num_generated_tokens))
        # async scheduling launches the next chunk before a step returns: the counter runs one chunk ahead
        want = [(32, 0), (40, 0), (40, 1)] if overlap else [(16, 0), (32, 0), (40, 1)]
        assert seen[:3] == want and seen[-1] == (40, 2), (overlap, seen)
    m = outs[0].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
