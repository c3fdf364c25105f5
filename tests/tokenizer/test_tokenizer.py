"""KimiTokenizer over a BPE file built in the test: round trips, tiktoken parity, specials, huge inputs."""

from __future__ import annotations

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_linear.errors import CheckpointError, ValidationError
from kimi_linear.loader import tokenizer as tokmod
from kimi_linear.loader.tokenizer import PAT_STR, KimiTokenizer, read_ranks, split_long_text

EMOJI = st.sampled_from(["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✨"])
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
COMBINING = st.characters(min_codepoint=0x0300, max_codepoint=0x036F)
SPACES = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", " " * 40, "\n\n\n", "\u3000", "\u00a0"])
PIECES = st.one_of(st.text(max_size=8), EMOJI, CJK, COMBINING, SPACES, st.sampled_from(["the", "fox", "'s", "123"]))
TEXTS = st.lists(PIECES, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_round_trip_random_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_ids_equal_tiktoken_direct(tok, bpe_folder, text):
    ranks = read_ranks(str(bpe_folder / "tiktoken.model"))
    enc = _direct(bpe_folder)
    assert len(ranks) == tok.num_base_tokens
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.encode(text, allow_special=False) == enc.encode(text, disallowed_special=())


_ENC = {}


def _direct(folder):
    if folder not in _ENC:
        ranks = read_ranks(str(folder / "tiktoken.model"))
        n = len(ranks)
        specials = {f"<|reserved_token_{i}|>": i for i in range(n, n + 256)}
        specials.update({name: i for name, i in KimiTokenizer.from_pretrained(folder).special_tokens.items()})
        _ENC[folder] = tiktoken.Encoding("direct", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    return _ENC[folder]


def test_special_tokens_encode_to_their_ids(tok):
    n = tok.num_base_tokens
    assert tok.vocab_size == n + 256 == len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 2, n + 255)
    assert tok.special_tokens["<|im_middle|>"] == n + 17
    assert tok.special_tokens[f"<|reserved_token_{n + 5}|>"] == n + 5
    ids = tok.encode("hi<|im_end|><|im_user|>x[BOS]")
    assert ids[-1] == n and n + 2 in ids and n + 3 in ids
    assert tok.decode(ids) == "hi<|im_end|><|im_user|>x[BOS]"
    # not allowed: the same string is plain text
    plain = tok.encode("<|im_end|>", allow_special=False)
    assert all(i < n for i in plain) and tok.decode(plain) == "<|im_end|>"
    assert tok.encode(f"<|reserved_token_{n + 200}|>") == [n + 200]


def test_decode_skip_and_spaces_between_special_tokens(tok):
    n = tok.num_base_tokens
    ids = tok.encode("a<|im_end|>b<|im_user|><|im_middle|>c")
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert tok.decode(ids, spaces_between_special_tokens=True) == "a <|im_end|> b <|im_user|> <|im_middle|> c"
    assert tok.decode(ids, skip_special_tokens=True, spaces_between_special_tokens=True) == "abc"
    assert tok.decode_bytes([n + 2]) == b"<|im_end|>"
    with pytest.raises(ValidationError, match="out of the vocabulary"):
        tok.decode([tok.vocab_size])


def test_byte_vocab_for_grammar_engines(tok):
    vocab = tok.byte_vocab(tok.vocab_size + 64)
    assert len(vocab) == tok.vocab_size + 64
    assert vocab[:256] == [bytes([b]) for b in range(256)]
    assert all(v == b"" for v in vocab[tok.num_base_tokens:])
    for i in range(256, tok.num_base_tokens):
        assert vocab[i] == tok.token_bytes(i) and len(vocab[i]) >= 2


@pytest.mark.parametrize("ch", ["a", " ", "\n", "你", "😀"])
def test_huge_single_character_input(tok, ch):
    text = ch * 1_000_000
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def _reference_split(s: str, limit: int):
    """The reference tokenizer's whitespace / non-whitespace run splitter, as a plain loop."""
    cur_len, cur_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now_space = s[i].isspace()
        if cur_space ^ now_space:
            cur_len, cur_space = 1, now_space
        else:
            cur_len += 1
            if cur_len > limit:
                yield s[start:i]
                start, cur_len = i, 1
    yield s[start:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a", " ", "\u2003", "\x1c", "é"]), st.integers(1, 60)), max_size=12))
def test_long_run_split_matches_reference_loop(monkeypatch_runs, runs):
    text = "".join(c * k for c, k in runs)
    want = [p for i in range(0, len(text), 50) for p in _reference_split(text[i:i + 50], 7)] or [""]
    assert list(split_long_text(text)) == want


@pytest.fixture
def monkeypatch_runs(monkeypatch):
    """Small limits (pieces of 50 chars, runs of 7) so that the reference loop stays fast."""
    import re

    monkeypatch.setattr(tokmod, "MAX_PIECE_CHARS", 50)
    monkeypatch.setattr(tokmod, "MAX_RUN_CHARS", 7)
    monkeypatch.setattr(tokmod, "_LONG_RUN", re.compile(r"\s{8,}|\S{8,}"))


def test_real_limits_split_points():
    text = "x" * 60_001 + " " * 25_001 + "y"
    pieces = list(split_long_text(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_001 + 25_000, 1 + 1]
    assert [len(p) for p in split_long_text("z" * 900_000)] == [25_000] * 36


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tiktoken.model"):
        KimiTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes(b"YQ== 0\nnot-a-line\n")
    with pytest.raises(CheckpointError, match=":2: not a 'base64-token rank' line"):
        KimiTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(CheckpointError, match="without gaps"):
        KimiTokenizer.from_pretrained(tmp_path)
    assert tokmod.load_tokenizer(tmp_path / "missing") is None
