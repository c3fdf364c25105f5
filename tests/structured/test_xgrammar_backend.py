"""xgrammar backend: every kind constrains tokens correctly; invalid specs are per-request errors."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from kimi_linear.errors import ConfigError, ValidationError
from kimi_linear.sampling_params import StructuredOutputsParams
from kimi_linear.structured import make_backend

STOP = {770, 769}


def new_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """All tokens allowed, as the runner's bitmask before the matchers fill their rows."""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def compile_params(backend, params: StructuredOutputsParams):
    return backend.compile(params.kind(), params.spec())


def allowed_ids(bitmask_row: torch.Tensor, V: int) -> list[int]:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return [i for i in bits.reshape(-1)[:V].nonzero()[:, 0].tolist()]


def random_walk(backend, tok, grammar, seed: int, max_steps: int = 300, prefer_short: bool = True):
    """Draw tokens uniformly among the allowed ones (stop as soon as allowed): text, ids, terminated."""
    rng = random.Random(seed)
    m = backend.matcher(grammar)
    bitmask = new_bitmask(1, backend.vocab_size)
    ids = []
    for _ in range(max_steps):
        m.fill_bitmask(bitmask, 0)
        allowed = allowed_ids(bitmask[0], backend.vocab_size)
        assert allowed, "the grammar allows no token"
        stops = [t for t in allowed if t in STOP]
        t = stops[0] if stops and prefer_short else rng.choice(allowed)
        assert m.accept(t)
        if t in STOP:
            assert m.is_terminated()
            return tok.decode(ids), ids, True
        ids.append(t)
    return tok.decode(ids), ids, False


def test_choice(backend, tiny_tok):
    choices = ["yes", "no", "maybe so", 'quote " and \\ 😀 é']
    g = compile_params(backend, StructuredOutputsParams(choice=choices))
    seen = set()
    for seed in range(12):
        text, _, done = random_walk(backend, tiny_tok, g, seed, prefer_short=False)
        assert done and text in choices
        seen.add(text)
    assert len(seen) >= 2


def test_regex(backend, tiny_tok):
    pattern = r"[a-z]{2,5}-\d{3}"
    g = backend.compile("regex", pattern)
    for seed in range(5):
        text, _, done = random_walk(backend, tiny_tok, g, seed, prefer_short=False)
        assert done and re.fullmatch(pattern, text), text


def test_ebnf_grammar(backend, tiny_tok):
    g = backend.compile("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9]+')
    text, _, done = random_walk(backend, tiny_tok, g, 3)
    assert done and re.fullmatch(r"\(\d+(,\d+)*\)", text)


def test_json_schema_walk_parses(backend, tiny_tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    g = backend.compile("json", json.dumps(schema))
    text, _, done = random_walk(backend, tiny_tok, g, 0)
    obj = json.loads(text)
    assert done and set(obj) == {"a", "b"} and isinstance(obj["a"], int) and obj["b"] in ("x", "y")


def test_json_object_and_specials_are_never_allowed(backend, tiny_tok):
    g = compile_params(backend, StructuredOutputsParams(json_object=True))
    m = backend.matcher(g)
    bitmask = new_bitmask(2, backend.vocab_size)
    m.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], torch.full_like(bitmask[0], -1))  # other rows untouched
    allowed = allowed_ids(bitmask[1], 1024)
    assert tiny_tok.encode("{")[0] in allowed and not any(t >= 768 for t in allowed)
    text, _, done = random_walk(backend, tiny_tok, g, 1)
    assert done and isinstance(json.loads(text), dict)


def test_rejected_token_leaves_the_state_unchanged(backend, tiny_tok):
    g = backend.compile("choice", ["abc", "xyz"])
    m = backend.matcher(g)
    bm = new_bitmask(1, backend.vocab_size)
    ids = tiny_tok.encode("abc")
    assert m.accept(ids[0])
    assert not m.accept(tiny_tok.encode("x")[0])  # rejected, state unchanged
    for t in ids[1:]:
        assert m.accept(t)
    m.fill_bitmask(bm, 0)
    assert set(allowed_ids(bm[0], 1024)) == STOP


def test_padded_model_vocab(tiny_tok):
    be = make_backend(tiny_tok, 1100, [770])
    assert be.vocab_size == 1100  # the bitmask is 35 words wide
    m = be.matcher(be.compile("regex", "[a-z]+"))
    bm = new_bitmask(1, be.vocab_size)
    m.fill_bitmask(bm, 0)
    assert all(t < 768 for t in allowed_ids(bm[0], 1100))


@pytest.mark.parametrize("kind,spec,match", [
    ("json", '{"type": ', "not valid JSON"),
    ("json", {"type": "foo"}, 'Unsupported type "foo"'),
    ("json", [1, 2], "must be an object or a boolean"),
    ("regex", "(ab", "parenthesis is not closed"),
    ("grammar", "root ::= undefined_rule", 'Rule "undefined_rule" is not defined'),
    ("nonsense", "x", "unknown kind"),
])
def test_invalid_spec_is_a_validation_error_for_that_request(backend, kind, spec, match):
    with pytest.raises(ValidationError, match=match) as e:
        backend.compile(kind, spec)
    assert e.value.param == "structured_outputs" and "/project/" not in str(e.value)
    assert backend.compile("regex", "ok") is not None  # the backend still works


def test_params_validation():
    with pytest.raises(ValidationError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a").kind()
    with pytest.raises(ValidationError, match="non-empty list of strings"):
        StructuredOutputsParams(choice=[]).kind()
    assert StructuredOutputsParams(json={}).spec() == {}
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend(None, name="outlines")


def test_json_strings_never_admit_control_characters(tiny_tok):
    """xgrammar's maxLength string rule admits raw control bytes; our JSON mask removes them."""
    for any_ws in (True, False):
        be = make_backend(tiny_tok, 1024, [770], any_whitespace=any_ws)
        m = be.matcher(be.compile("json", {"type": "string", "maxLength": 5}))
        assert m.accept(tiny_tok.encode('"')[0])
        bm = new_bitmask(1, be.vocab_size)
        m.fill_bitmask(bm, 0)
        allowed = set(allowed_ids(bm[0], 1024))
        assert ord("a") in allowed and not allowed & {0x00, 0x01, 0x1E, 0x1F}
        assert (0x09 in allowed) == any_ws
        assert not any(set(tiny_tok.token_bytes(t)) & set(range(0x0B, 0x0D)) for t in allowed)
    # regex grammars are left alone: a control character is a legal regex match
    m = be.matcher(be.compile("regex", "[\\x00-\\x1f]"))
    m.fill_bitmask(bm, 0)
    assert 0x1E in allowed_ids(bm[0], 1024)
