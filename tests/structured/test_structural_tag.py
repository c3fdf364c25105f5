"""The structural_tag kind: the kimi_k2 parser's forced tool-call tag compiled by the xgrammar backend.

Random walks over the allowed tokens (the worst a model can do) always give one tool-call section whose
markers are the special tokens themselves, never text, whose calls parse with the parser and whose
arguments validate against their function's schema (compact JSON, no raw control characters); special
tokens are never allowed inside the arguments. Token names resolve to ids, the older
{structures, triggers} form works, bad tags are per-request errors, and the plain kinds still never
allow a special token.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from kimi_linear.errors import ValidationError
from kimi_linear.server.tool_parsers import get_tool_parser
from kimi_linear.structured import make_backend

STOP = {770, 769}
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["tz"], "additionalProperties": False}}
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def compact(tiny_tok):
    """A backend as the engine builds it (compact JSON)."""
    return make_backend(tiny_tok, 1024, sorted(STOP), any_whitespace=False)


@pytest.fixture(scope="module")
def parser(tiny_tok):
    return get_tool_parser("kimi_k2", tiny_tok)


def walk(backend, grammar, seed: int, max_steps: int = 400) -> tuple[list[int], bool]:
    """Uniformly random allowed tokens until a stop token is allowed: (ids, terminated)."""
    rng = random.Random(seed)
    m = backend.matcher(grammar)
    bitmask = torch.full((1, (backend.vocab_size + 31) // 32), -1, dtype=torch.int32)
    ids = []
    for _ in range(max_steps):
        bitmask.fill_(-1)
        m.fill_bitmask(bitmask, 0)
        bits = (bitmask[0][:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.reshape(-1)[:backend.vocab_size].nonzero()[:, 0].tolist()
        stops = [t for t in allowed if t in STOP]
        t = stops[0] if stops else rng.choice(allowed)
        assert m.accept(t)
        if t in STOP:
            return ids, m.is_terminated()
        ids.append(t)
    return ids, False


@pytest.mark.parametrize("functions,parallel", [([WEATHER, TIME], True), ([WEATHER, TIME], False), ([TIME], False)],
                         ids=["required-parallel", "required-one", "named"])
def test_forced_calls_always_parse_and_validate(compact, parser, tiny_tok, functions, parallel):
    g = compact.compile("structural_tag", json.dumps(parser.structural_tag(functions, parallel)))
    sp = tiny_tok.special_tokens
    markers = {sp[n] for n in ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                               "<|tool_call_argument_begin|>", "<|tool_call_end|>")}
    names = set()
    for seed in range(6):
        ids, done = walk(compact, g, seed)
        assert done
        assert {t for t in ids if tiny_tok.is_special(t)} <= markers  # only markers, and only as tokens
        assert ids[0] == sp["<|tool_calls_section_begin|>"] and ids[-1] == sp["<|tool_calls_section_end|>"]
        text = tiny_tok.decode(ids)
        assert text.count("<|tool_call_begin|>") == ids.count(sp["<|tool_call_begin|>"])  # never spelt as text
        got = parser.extract(text)
        assert got.content == "" and got.tool_calls
        assert len(got.tool_calls) == 1 or parallel
        for c in got.tool_calls:
            assert c.name in {f["name"] for f in functions}
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
            assert "\n" not in c.arguments and ": " in c.arguments  # the engine's compact JSON
            names.add(c.name)
    assert names == {f["name"] for f in functions}  # every function is reachable


def test_names_resolve_and_the_older_form(backend, tiny_tok):
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "ok"}, {"type": "token", "token": "<|im_middle|>"}]}}
    ids, done = walk(backend, backend.compile("structural_tag", tag), 0)
    assert done and ids[-1] == tiny_tok.special_tokens["<|im_middle|>"] and tiny_tok.decode(ids[:-1]) == "ok"
    legacy = {"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"a": {"enum": [1, 2]}},
                                                         "required": ["a"]}, "end": "</f>"}], "triggers": ["<f"]}
    g = backend.compile("structural_tag", json.dumps(legacy))
    m = backend.matcher(g)
    for t in tiny_tok.encode('hi <f>{"a": 2}</f> bye'):
        assert m.accept(t)
    m2 = backend.matcher(g)
    for t in tiny_tok.encode("<f>"):
        assert m2.accept(t)
    assert not m2.accept(tiny_tok.encode("x")[0])  # after the begin, only the schema


@pytest.mark.parametrize("spec,match", [
    ("{not json", "not valid JSON"),
    ([1], "must be a JSON object"),
    ({"type": "structural_tag"}, 'needs a "format"'),
    ({"format": {"type": "token", "token": "<|no_such_token|>"}}, "invalid"),
    ({"format": {"type": "json_schema", "json_schema": {"type": "nope"}}}, "invalid JSON schema"),
    ({"structures": [{"begin": 1}], "triggers": ["<"]}, "structures"),
])
def test_bad_tags_are_request_errors(backend, spec, match):
    with pytest.raises(ValidationError, match=match) as e:
        backend.compile("structural_tag", spec)
    assert e.value.param == "structured_outputs"
    backend.compile("regex", "a+")  # the backend stays usable


def test_plain_kinds_still_never_allow_special_tokens(backend, tiny_tok):
    m = backend.matcher(backend.compile("regex", r"[\s\S]{0,8}"))
    bitmask = torch.full((1, 32), -1, dtype=torch.int32)
    m.fill_bitmask(bitmask, 0)
    bits = ((bitmask[0][:, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)
    specials = [i for i in range(tiny_tok.num_base_tokens, 1024) if bits[i] and i not in STOP]
    assert specials == []
