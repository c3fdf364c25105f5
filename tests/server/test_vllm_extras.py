"""vLLM's extras through the official `openai` client: `prompt_logprobs` in vLLM's shape (completions and
chat), the legacy `guided_json` / `guided_regex` / `guided_choice` fields, `/v1/models/{id}`, and
`/tokenizer_info` as lm-eval's remote tokenizer reads it."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

AUTH = {"Authorization": "Bearer test-key"}


def _check_prompt_logprobs(plp: list, prompt_ids: list[int], k: int) -> None:
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for tid, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(tid) in entry and len(entry) <= k + 1
        for v in entry.values():
            assert set(v) == {"logprob", "rank", "decoded_token"} and v["logprob"] <= 0 and v["rank"] >= 1
        ranks = sorted(v["rank"] for t, v in entry.items() if t != str(tid))
        assert ranks == list(range(1, len(ranks) + 1))


def test_completion_prompt_logprobs_match_echo(oai):
    ids = [11, 12, 13, 14, 15, 16]
    r = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                               extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    _check_prompt_logprobs(plp, ids, 2)
    echo = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=0)
    token_lps = echo.choices[0].logprobs.token_logprobs[:len(ids)]
    assert token_lps[0] is None
    got = [plp[i][str(t)]["logprob"] for i, t in enumerate(ids) if i]
    assert got == pytest.approx(token_lps[1:], abs=1e-6)


def test_no_prompt_logprobs_unless_asked(oai):
    r = oai.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert r.choices[0].model_extra.get("prompt_logprobs") is None


def test_chat_prompt_logprobs_top_level(oai, server):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={"prompt_logprobs": 1})
    ids = httpx.post(server.url + "/tokenize", json={"messages": msgs}, headers=AUTH).json()["tokens"]
    _check_prompt_logprobs(r.model_extra["prompt_logprobs"], ids, 1)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_with_stream_is_400(server, path):
    body = {"model": "tiny", "max_tokens": 2, "stream": True, "prompt_logprobs": 1}
    body.update({"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(server.url + path, json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_guided_json_is_enforced(oai):
    from jsonschema import validate

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "ok": {"type": "boolean"}},
              "required": ["city", "ok"], "additionalProperties": False}
    for field in (schema, json.dumps(schema)):
        r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a city"}],
                                        max_tokens=60, temperature=0.7, seed=1, extra_body={"guided_json": field})
        assert r.choices[0].finish_reason == "stop"
        validate(json.loads(r.choices[0].message.content), schema)


def test_guided_choice_and_regex(oai):
    r = oai.completions.create(model="tiny", prompt="Pick:", max_tokens=10, temperature=1.0, seed=3,
                               extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert r.choices[0].text in ("alpha", "beta", "gamma")
    r = oai.completions.create(model="tiny", prompt="Code:", max_tokens=12, temperature=1.0, seed=4,
                               extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", r.choices[0].text)


@pytest.mark.parametrize("extra, param", [
    ({"guided_json": {"type": "object"}, "structured_outputs": {"regex": "a"}}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_guided_conflicts_are_400(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param


def test_model_by_id(oai):
    m = oai.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4")
    assert "gpt-4" in e.value.body["message"] and "tiny" in e.value.body["message"]


def test_tokenizer_info_as_lm_eval_reads_it(server):
    info = httpx.get(server.url + "/tokenizer_info").json()
    tok = server.client.engine.tokenizer
    assert info["tokenizer_class"] == "TikTokenTokenizer" and info["eos_token"] == tok.eos_token
    assert info["bos_token"] == tok.bos_token and info["model_max_length"] == 512
    assert info["added_tokens_decoder"][str(tok.eos_token_id)] == tok.eos_token
    assert "{%" in info["chat_template"]
    # lm-eval finds the EOS / BOS ids by tokenizing their strings without special tokens added
    for name in ("eos", "bos"):
        r = httpx.post(server.url + "/tokenize", json={"prompt": info[f"{name}_token"], "add_special_tokens": False},
                       headers=AUTH)
        assert r.json()["tokens"] == [getattr(tok, f"{name}_token_id")]
    r = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode("hello world")}, headers=AUTH)
    assert r.json() == {"prompt": "hello world"}
