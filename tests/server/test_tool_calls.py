"""Tool calling through the official `openai` client against the tiny model on loopback.

- The shared server (no tool flags): "auto" (the default with tools) is a 400 naming both flags; bad
  `tools` / `tool_choice` are 400s naming the field; "none" renders the tools but parses nothing;
  "required" and a named function are forced by a structural tag, so even the random model's calls
  parse and their arguments validate against the schema (jsonschema), streamed or not (the same
  greedy answer both ways, the OpenAI delta shape); a tool-result turn renders the call and the result
  and numbers the next call after the conversation's.
- A server with `--enable-auto-tool-choice --tool-call-parser kimi_k2`: "auto" parses whatever the model
  writes. The random model rarely writes a section, so the request itself constrains the output with a
  `structured_outputs.structural_tag` (text, then a section of two calls): content and parallel calls
  come apart, streamed and not; parallel_tool_calls=false keeps the first; special tokens the model
  emits never reach the content.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from loopback import API_KEY, openai_client, serving

H = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["tz"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MARKERS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
           "<|tool_call_argument_begin|>", "<|tool_call_end|>")
KW = dict(model="tiny", temperature=0, max_tokens=60)


def check_calls(calls, first_index: int = 0):
    for i, c in enumerate(calls):
        assert c.type == "function" and c.id == f"functions.{c.function.name}:{first_index + i}"
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def collect(stream):
    """(content, {index: [id, name, arguments]}, finish_reasons, chunks) of a streamed answer."""
    chunks = list(stream)
    content, calls, finishes = "", {}, []
    for ch in chunks:
        for choice in ch.choices:
            d = choice.delta
            content += d.content or ""
            for t in d.tool_calls or []:
                if t.index not in calls:  # the first delta of a call: index, id, type, name
                    assert t.id and t.type == "function" and t.function.name and t.function.arguments == ""
                    calls[t.index] = [t.id, t.function.name, ""]
                else:  # then only argument fragments
                    assert t.id is None and t.function.name is None and t.function.arguments
                    calls[t.index][2] += t.function.arguments
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return content, calls, finishes, chunks


# --------------------------------------------------------------------------- the flags
def test_the_flags_reach_the_server_and_are_checked(tiny_checkpoint, monkeypatch, capsys):
    import kimi_linear.server.launch as launch
    from kimi_linear.cli.main import main

    seen = {}
    monkeypatch.setattr(launch, "serve", lambda kwargs, names, **kw: seen.update(kw))
    assert main(["serve", str(tiny_checkpoint), "--enable-auto-tool-choice", "--tool-call-parser", "kimi_k2"]) == 0
    assert seen["tool_call_parser"] == "kimi_k2" and seen["enable_auto_tool_choice"] is True
    assert main(["serve", str(tiny_checkpoint)]) == 0
    assert seen["tool_call_parser"] is None and seen["enable_auto_tool_choice"] is False
    assert main(["serve", str(tiny_checkpoint), "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser (available: kimi_k2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tiny_checkpoint), "--tool-call-parser", "hermes"])
    err = capsys.readouterr().err
    assert "usage: kimi-linear serve" in err and "invalid choice: 'hermes'" in err


# --------------------------------------------------------------------------- no tool flags
def test_auto_needs_both_flags(oai):
    for extra in ({}, {"tool_choice": "auto"}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(messages=MSG, tools=TOOLS, **KW, **extra)
        assert "--enable-auto-tool-choice and --tool-call-parser" in e.value.message
        assert e.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("body,param,match", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not match any of the specified `tools`"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Only named tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "Correct usage"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "tool_choice": "required"},
     "tools[0].function.name", "non-empty string"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}], "tool_choice": "required"},
     "tools[0].function.parameters", "JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools", "cannot be compiled"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
], ids=["unknown-function", "no-tools", "bad-choice", "bad-named", "no-name", "bad-parameters", "bad-schema",
        "with-response-format"])
def test_bad_tool_requests_are_400s(server, body, param, match):
    r = httpx.post(server.url + "/v1/chat/completions", headers=H, timeout=120,
                   json={"model": "tiny", "messages": MSG, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


def test_none_renders_tools_and_parses_nothing(oai):
    plain = oai.chat.completions.create(messages=MSG, **{**KW, "max_tokens": 4})
    r = oai.chat.completions.create(messages=MSG, tools=TOOLS, tool_choice="none", **{**KW, "max_tokens": 4})
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the declarations are in the prompt
    c = r.choices[0]
    assert c.message.tool_calls == [] and c.finish_reason in ("stop", "length")
    assert isinstance(c.message.content, str)


@pytest.fixture(scope="module")
def long_server(tiny_checkpoint):
    """A server with room for the longer prompts of the tests below (tool declarations + a tool turn)."""
    yield from serving(str(tiny_checkpoint), max_model_len=1024)


@pytest.fixture(scope="module")
def long_oai(long_server):
    return openai_client(long_server)


def test_required_calls_validate_against_the_schema(long_oai):
    oai = long_oai
    r = oai.chat.completions.create(messages=MSG, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **KW)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    check_calls(c.message.tool_calls)
    # sampled, n = 2, parallel calls allowed: each choice one call or more, every one valid
    r = oai.chat.completions.create(messages=MSG, tools=TOOLS, tool_choice="required", n=2, seed=5,
                                    **{**KW, "temperature": 1.0, "max_tokens": 160})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
        check_calls(c.message.tool_calls)


def test_named_function_streamed_as_openai_does(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    ref = oai.chat.completions.create(messages=MSG, tools=TOOLS, tool_choice=named, **KW).choices[0]
    assert ref.finish_reason == "tool_calls" and ref.message.content is None
    assert [t.function.name for t in ref.message.tool_calls] == ["get_weather"]
    check_calls(ref.message.tool_calls)
    content, calls, finishes, chunks = collect(
        oai.chat.completions.create(messages=MSG, tools=TOOLS, tool_choice=named, stream=True, **KW))
    assert content == "" and finishes == ["tool_calls"]
    assert chunks[0].choices[0].delta.role == "assistant"
    t = ref.message.tool_calls[0]
    assert calls == {0: [t.id, t.function.name, t.function.arguments]}
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls) > 2  # arguments in pieces


def test_tool_result_turn(long_oai, long_server):
    oai, server = long_oai, long_server
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    conv = MSG + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18 degrees, sunny"}]
    ids = httpx.post(server.url + "/tokenize", headers=H, json={"model": "tiny", "messages": conv}).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", headers=H, json={"model": "tiny", "tokens": ids}).json()["prompt"]
    assert ("<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
            'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris", "unit": "c"}<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|>") in prompt
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18 degrees, sunny<|im_end|>" in prompt
    r = oai.chat.completions.create(messages=conv, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}}, **KW)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    check_calls(c.message.tool_calls, first_index=1)  # the conversation's second call
    assert c.message.tool_calls[0].id == "functions.get_time:1"


# --------------------------------------------------------------------------- --enable-auto-tool-choice
@pytest.fixture(scope="module")
def auto_oai(tiny_checkpoint):
    # the tool schemas in the prompt: ~500 tokens of JSON
    for srv in serving(str(tiny_checkpoint), tool_call_parser="kimi_k2", enable_auto_tool_choice=True,
                       max_model_len=1024):
        yield openai_client(srv)


def forced_output(text: str) -> dict:
    """A structural tag making the model write `text`, then a section calling get_weather and get_time."""
    def call(name: str, schema: dict) -> dict:
        return {"type": "tag", "begin": {"type": "token", "token": "<|tool_call_begin|>"}, "content": {
            "type": "sequence", "elements": [{"type": "const_string", "value": f"functions.{name}:7"},
                                             {"type": "token", "token": "<|tool_call_argument_begin|>"},
                                             {"type": "json_schema", "json_schema": schema}]},
            "end": {"type": "token", "token": "<|tool_call_end|>"}}

    return {"structured_outputs": {"structural_tag": json.dumps({"type": "structural_tag", "format": {
        "type": "sequence", "elements": [{"type": "const_string", "value": text},
                                         {"type": "token", "token": "<|tool_calls_section_begin|>"},
                                         call("get_weather", WEATHER), call("get_time", TIME),
                                         {"type": "token", "token": "<|tool_calls_section_end|>"}]}})}}


def test_auto_parses_text_and_parallel_calls(auto_oai):
    extra = forced_output("Checking both.")
    r = auto_oai.chat.completions.create(messages=MSG, tools=TOOLS, extra_body=extra, **{**KW, "max_tokens": 160})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking both."
    assert [t.function.name for t in c.message.tool_calls] == ["get_weather", "get_time"]
    check_calls(c.message.tool_calls)  # ids numbered by the server (the model wrote :7 twice)
    content, calls, finishes, _ = collect(auto_oai.chat.completions.create(
        messages=MSG, tools=TOOLS, extra_body=extra, stream=True, **{**KW, "max_tokens": 160}))
    assert content == "Checking both." and finishes == ["tool_calls"]
    assert calls == {i: [t.id, t.function.name, t.function.arguments] for i, t in enumerate(c.message.tool_calls)}
    one = auto_oai.chat.completions.create(messages=MSG, tools=TOOLS, extra_body=extra, parallel_tool_calls=False,
                                           **{**KW, "max_tokens": 160}).choices[0]
    assert [t.function.name for t in one.message.tool_calls] == ["get_weather"]
    assert one.message.tool_calls[0].function.arguments == c.message.tool_calls[0].function.arguments


def test_auto_content_never_carries_special_tokens(auto_oai, tiny_checkpoint):
    from kimi_linear.loader.tokenizer import load_tokenizer

    sp = load_tokenizer(tiny_checkpoint).special_tokens
    boosted = [sp["<|tool_call_end|>"], sp["<|im_user|>"], sp["<|reserved_token_800|>"]]
    r = auto_oai.chat.completions.create(messages=MSG, tools=TOOLS, logprobs=True, seed=3, temperature=1.0,
                                         max_tokens=16, model="tiny", logit_bias={str(t): 4 for t in boosted})
    c = r.choices[0]
    generated = [t.token for t in c.logprobs.content]
    assert any(t in ("<|tool_call_end|>", "<|im_user|>", "<|reserved_token_800|>") for t in generated)
    assert "<|" not in c.message.content and not any(m in c.message.content for m in MARKERS)
