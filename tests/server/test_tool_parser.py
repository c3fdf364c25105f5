"""The kimi_k2 tool parser on its own (no model): whole outputs, streaming in any chunking equals the
whole-output parse, no marker ever leaks into content or arguments, held-back marker prefixes,
malformed and truncated calls, special-token stripping, parallel_tool_calls=false, the flags' check."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kimi_linear.errors import ConfigError, ValidationError
from kimi_linear.server.tool_parsers import KimiK2ToolParser, check_tool_flags, get_tool_parser
from kimi_linear.server.tool_parsers.kimi_k2 import MARKERS
from kimi_linear.tools.tokenizer import special_token_names

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(header: str, args: str) -> str:
    return f"{CB}{header}{AB}{args}{CE}"


@pytest.fixture(scope="module")
def parser():
    names = special_token_names(768)  # the tiny tokenizer's layout: 256 specials after 768 base ranks
    return get_tool_parser("kimi_k2", SimpleNamespace(special_tokens={n: i for i, n in names.items()}))


def calls_of(extracted):
    return [(c.name, c.arguments) for c in extracted.tool_calls]


def stream(parser, text: str, cuts: list[int], **kw):
    """Feed `text` cut at `cuts`; (content, calls, deltas) rebuilt from the deltas."""
    s = parser.streamer(**kw)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [s.feed(p) for p in pieces] + [s.finish()]
    content, calls = "", []
    for d in deltas:
        content += d.content
        for t in d.tool_calls:
            if t.name is not None:
                assert t.index == len(calls)  # a call's first delta names it, in order
                calls.append([t.name, ""])
            else:
                assert t.index < len(calls)
            calls[t.index][1] += t.arguments
    return content, [tuple(c) for c in calls], deltas


PARIS = '{"city": "Paris"}'
TEXTS = [
    "plain text, no calls",
    "Let me check." + SB + call("functions.get_weather:0", PARIS) + SE,
    SB + " " + call(" functions.get_weather:0 ", f" {PARIS} ") + "\n" + call("functions.x.y:1", "{}") + SE,
    "a" + SB + call("functions.get_weather:0", '{"a": [1, 2]}') + SE + "b",
    SB + call("functions.f:0", '{"s": "<|x"}') + SE,  # a marker-like string inside the arguments
    "<|tool_call_section_begin|>" + call("get_time:3", '{"tz": 2}') + "<|tool_call_section_end|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_in_any_chunking_equals_whole_output(parser, text):
    whole = parser.extract(text)
    rng = random.Random(len(text))
    chunkings = [list(range(1, len(text))), []] + [sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
                                                   for _ in range(6)]
    for cuts in chunkings:
        content, calls, deltas = stream(parser, text, cuts)
        assert (content, calls) == (whole.content, calls_of(whole))
        for d in deltas:
            for piece in [d.content] + [t.arguments for t in d.tool_calls]:
                assert not any(m in piece for m in MARKERS), piece


def test_whole_outputs(parser):
    got = parser.extract(TEXTS[1])
    assert got.content == "Let me check." and calls_of(got) == [("get_weather", '{"city": "Paris"}')]
    got = parser.extract(TEXTS[2])  # whitespace around markers and arguments is not part of them
    assert got.content == "" and calls_of(got) == [("get_weather", '{"city": "Paris"}'), ("x.y", "{}")]
    got = parser.extract(TEXTS[3])  # text after the section is content too
    assert got.content == "ab" and calls_of(got) == [("get_weather", '{"a": [1, 2]}')]
    assert calls_of(parser.extract(TEXTS[4])) == [("f", '{"s": "<|x"}')]
    assert calls_of(parser.extract(TEXTS[5])) == [("get_time", '{"tz": 2}')]  # singular variant, no prefix
    assert parser.extract(TEXTS[0]).content == TEXTS[0] and parser.extract(TEXTS[0]).tool_calls == []


def test_marker_prefixes_are_held_back_until_resolved(parser):
    s = parser.streamer()
    assert s.feed("Hello <|tool_ca").content == "Hello "
    d = s.feed("lls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_arg")
    assert d.content == "" and d.tool_calls == []  # the name waits for the arguments marker
    d = s.feed("ument_begin|>{\"a\": 1}  <|tool_call_e")
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "f", '{"a": 1}')]
    d = s.feed("nd|><|tool_calls_section_end|> <|tool")
    assert d.content == " " and d.tool_calls == []
    assert s.finish().content == "<|tool"  # not a marker after all: released at the end


def test_malformed_and_truncated_calls(parser):
    # a header with no arguments marker, and one that names nothing, are dropped; text between calls too
    text = SB + "junk" + CB + "functions.f:0" + CE + call("  ", "{}") + call("functions.g:1", "{}") + SE
    assert calls_of(parser.extract(text)) == [("g", "{}")]
    # a call cut off (max_tokens) keeps its partial arguments; a cut header is no call
    assert calls_of(parser.extract(f"{SB}{CB}functions.f:0{AB}{{\"city\": \"Pa")) == [("f", '{"city": "Pa')]
    assert parser.extract(f"x{SB}{CB}functions.f").tool_calls == []
    # a call whose end marker is missing ends at the next call or at the section end
    text = f"{SB}{CB}functions.f:0{AB}{{}}{CB}functions.g:1{AB}[1]{SE}"
    assert calls_of(parser.extract(text)) == [("f", "{}"), ("g", "[1]")]


def test_special_tokens_and_stray_markers_leave_the_content(parser):
    text = "a<|reserved_token_800|>b<|tool_call_end|>c[EOS]d<|im_user|>"
    assert parser.extract(text).content == "abcd"
    assert parser.extract(text, strip_special_tokens=False).content == "a<|reserved_token_800|>bc[EOS]d<|im_user|>"
    content, _, _ = stream(parser, text, list(range(1, len(text))))
    assert content == "abcd"


def test_parallel_tool_calls_false_keeps_the_first_call(parser):
    text = SB + call("functions.f:0", "{}") + call("functions.g:1", "[2]") + SE
    assert calls_of(parser.extract(text, max_calls=1)) == [("f", "{}")]
    content, calls, _ = stream(parser, text, list(range(1, len(text))), max_calls=1)
    assert calls == [("f", "{}")]


def test_ids_and_the_flags_check(parser):
    assert parser.call_id("get_weather", 3) == "functions.get_weather:3"
    check_tool_flags("kimi_k2", True)
    check_tool_flags(None, False)
    with pytest.raises(ConfigError, match="needs --tool-call-parser"):
        check_tool_flags(None, True)
    with pytest.raises(ConfigError, match="unknown tool-call parser 'hermes'; available: kimi_k2"):
        check_tool_flags("hermes", False)
    with pytest.raises(ValidationError, match="no <|tool_calls_section_begin|>"):
        KimiK2ToolParser(SimpleNamespace(special_tokens={"[EOS]": 1}))
