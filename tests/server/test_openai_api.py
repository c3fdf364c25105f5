"""The server driven by the official `openai` client: chat and completions, streaming and not, n > 1,
stop, seeds, logprobs, echo with prompt logprobs, JSON-schema output; plus /tokenize, /detokenize,
/v1/models, /version, /health and /metrics."""

from __future__ import annotations

import json

import httpx
import pytest

MSG = [{"role": "user", "content": "Say something about linear attention."}]


def test_models_lists_served_name(oai, server):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"]
    raw = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer test-key"}).json()
    assert raw["data"][0]["max_model_len"] == 512 and raw["object"] == "list"


def test_chat_non_streaming(oai):
    r = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(oai):
    ref = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    stream = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])
    assert text == ref.choices[0].message.content
    ids = {ch.id for ch in chunks}
    assert len(ids) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_one_chunk_per_token(server):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 7, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer test-key"}, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    token_events = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] is None]
    assert len(token_events) == 7
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_prompt_forms_and_n(oai):
    r = oai.completions.create(model="tiny", prompt=["Hello", "World"], max_tokens=4, n=2, temperature=1.0,
                               seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    r2 = oai.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, temperature=0)
    assert len(r2.choices) == 2 and r2.usage.prompt_tokens == 5


def test_seed_reproducible(oai):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9)
    a = oai.completions.create(seed=1234, **kw).choices[0].text
    b = oai.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {oai.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3, 4)}
    assert len(others | {a}) > 1


def test_stop_string_never_leaks(oai):
    base = oai.completions.create(model="tiny", prompt="The state of", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 4
    stop = base[2:5]
    r = oai.completions.create(model="tiny", prompt="The state of", max_tokens=12, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop" and stop not in c.text and base.startswith(c.text)
    assert c.model_extra.get("stop_reason") == stop
    s = oai.completions.create(model="tiny", prompt="The state of", max_tokens=12, temperature=0, stop=[stop],
                               stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == c.text


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)  # greedy
        assert isinstance(item.bytes, list)


def test_completion_echo_with_prompt_logprobs(oai, server):
    prompt = [11, 12, 13, 14, 15]
    r = oai.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    # the prompt logprob of token t equals the model's log_softmax at position t-1
    import torch

    from kimi_linear import KimiLinearForCausalLM

    engine = server.client.engine
    model = KimiLinearForCausalLM.from_pretrained(engine.config.model, dtype=engine.runner.dtype, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).float(), -1)[0]
    for t in range(1, len(prompt)):  # the server runs the checkpoint's bf16: compare with the same model
        assert lp.token_logprobs[t] == pytest.approx(logp[t - 1, prompt[t]].item(), abs=1e-4)


def test_json_schema_output(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Give me a person as JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    import jsonschema

    jsonschema.validate(data, schema)


def test_json_object_output(oai, server):
    # A random model may never close a JSON string or object; a bias towards '"' and '}' makes it finish
    # deterministically.
    quote, close = (httpx.post(server.url + "/tokenize", json={"prompt": text},
                               headers={"Authorization": "Bearer test-key"}).json()["tokens"][0] for text in '"}')
    r = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0,
                                    response_format={"type": "json_object"},
                                    logit_bias={str(quote): 10.0, str(close): 6.0})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tokenize_detokenize(server):
    h = {"Authorization": "Bearer test-key"}
    t = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 512
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "hello world"


def test_health_version_metrics(oai, server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()
    oai.completions.create(model="tiny", prompt="x", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("kimi_linear:num_requests_running", "kimi_linear:num_requests_waiting",
                 "kimi_linear:kv_cache_usage_perc", "kimi_linear:kda_state_usage_perc",
                 "kimi_linear:prompt_tokens_total", "kimi_linear:generation_tokens_total",
                 "kimi_linear:request_success_total", "kimi_linear:time_to_first_token_seconds_bucket",
                 "kimi_linear:inter_token_latency_seconds_bucket", "kimi_linear:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert 'model_name="tiny"' in text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    gen = fams["kimi_linear:generation_tokens"].samples
    assert sum(s.value for s in gen if s.name.endswith("_total")) >= 2
