"""Incremental detokenization: joined deltas equal the full decode; no half characters emitted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_linear.engine.detokenizer import IncrementalDetokenizer

TEXT = st.lists(st.one_of(st.sampled_from(["😀", "🚀", "你好", "é", "e\u0301", "ß", "  ", "\n", "hello", " the"]),
                          st.characters(min_codepoint=0x80, max_codepoint=0x2FFFF, exclude_categories=("Cs",))),
                max_size=30).map("".join)


def _stream(tok, ids, chunks, **flags):
    d = IncrementalDetokenizer(tok, **flags)
    deltas, i = [], 0
    for c in chunks:
        deltas.append(d.push(ids[i:i + c]))
        i += c
    deltas.append(d.push(ids[i:]))
    deltas.append(d.flush())
    return deltas


@settings(max_examples=150, deadline=None)
@given(TEXT, st.lists(st.integers(0, 3), max_size=40))
def test_multibyte_stream_joins_to_full_decode(tiny_tok, text, chunks):
    ids = tiny_tok.encode(text)
    deltas = _stream(tiny_tok, ids, chunks)
    assert "".join(deltas) == tiny_tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # never half a character


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 1023), max_size=40), st.lists(st.integers(0, 3), max_size=40),
       st.booleans(), st.booleans())
def test_any_ids_any_flags_join_to_full_decode(tiny_tok, ids, chunks, skip, spaces):
    deltas = _stream(tiny_tok, ids, chunks, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    assert "".join(deltas) == tiny_tok.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)


def test_split_character_is_held_back(tiny_tok):
    raw = "😀".encode()  # 4 bytes: ids 0..255 are single bytes
    d = IncrementalDetokenizer(tiny_tok)
    assert [d.push([b]) for b in raw] == ["", "", "", "😀"]
    assert d.push([raw[0]]) == "" and d.flush() == "\ufffd"


@pytest.mark.parametrize("skip,spaces,want", [
    (True, True, "ab"), (True, False, "ab"),
    (False, False, "a<|im_end|>b"), (False, True, "a <|im_end|> b"),
])
def test_special_token_flags(tiny_tok, skip, spaces, want):
    ids = [ord("a"), 770, ord("b")]
    d = IncrementalDetokenizer(tiny_tok, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    assert "".join(d.push([i]) for i in ids) + d.flush() == want
