"""Prefix caching through the server: `usage.prompt_tokens_details.cached_tokens` in both APIs (streamed and
not) and the Prometheus prefix-cache counters and snapshot gauge."""

from __future__ import annotations

import json
import random

import httpx
from loopback import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}


def completion(server, prompt, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, **kw}
    return httpx.post(server.url + "/v1/completions", json=body, headers=H, timeout=120)


def test_cached_tokens_in_usage_and_metrics(server):
    prompt = [random.Random(13).randrange(1000) for _ in range(150)]  # block size 64: boundaries at 64, 128
    first = completion(server, prompt).json()["usage"]
    assert first["prompt_tokens"] == 150 and first["prompt_tokens_details"] == {"cached_tokens": 0}
    again = completion(server, prompt + [7, 8]).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == 128  # the last boundary before the first prompt's end
    lines = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt + [9], "max_tokens": 2,
                                                            "stream": True, "stream_options": {"include_usage": True}},
                       headers=H, timeout=120).text.splitlines()
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["prompt_tokens_details"]["cached_tokens"] == 128
    chat = httpx.post(server.url + "/v1/chat/completions", headers=H, timeout=120,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2})
    assert "cached_tokens" in chat.json()["usage"]["prompt_tokens_details"]

    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    total = {n: sum(s.value for s in fams[f"kimi_linear:{n}"].samples if s.name.endswith("_total"))
             for n in ("prefix_cache_queries", "prefix_cache_hits")}
    assert total["prefix_cache_hits"] >= 256 and total["prefix_cache_queries"] >= 150 + 152 + 151
    assert 0.0 <= fams["kimi_linear:kda_snapshot_usage_perc"].samples[0].value <= 1.0
