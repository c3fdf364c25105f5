"""Stop conditions and streamed text: stop strings never leak, min_tokens, EOS, stop ids, length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_linear.engine.stop_checker import SequenceOutput
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams

EOS = 770


def byte_ids(text: str) -> list[int]:
    return list(text.encode())  # ids 0..255 are the single bytes: one token per byte


def run(tok, ids, chunk=1, eos=(EOS,), **kw):
    seq = SequenceOutput(SamplingParams(**{"max_tokens": None, **kw}), tok, eos)
    deltas = []
    for i in range(0, len(ids), chunk):
        d = seq.append(ids[i:i + chunk])
        deltas.append(d.text)
        if d.finished:
            break
    else:
        deltas.append(seq.finish("abort").text)
    return seq, deltas


def test_stop_string_split_across_tokens_is_never_emitted(tiny_tok):
    seq, deltas = run(tiny_tok, byte_ids("Hello STOP world"), stop=["STOP"])
    assert seq.finish_reason == "stop" and seq.stop_reason == "STOP"
    assert seq.text == "".join(deltas) == "Hello "
    streamed = ""
    for d in deltas:
        streamed += d
        assert "S" not in streamed  # not even the first character of the split match
    seq, _ = run(tiny_tok, byte_ids("Hello STOP world"), stop=["STOP"], include_stop_str_in_output=True)
    assert seq.text == "Hello STOP"


def test_partial_match_is_released_when_it_fails(tiny_tok):
    seq, deltas = run(tiny_tok, byte_ids("a STO b"), stop=["STOP"])
    assert deltas[:6] == ["a", " ", "", "", "", "STO "]
    assert seq.text == "a STO b" and seq.finish_reason == "abort"


def test_stop_inside_multibyte_tokens(tiny_tok):
    ids = tiny_tok.encode("数据😀结束了")
    seq, deltas = run(tiny_tok, ids, stop=["结束"])
    assert seq.text == "数据😀" and seq.stop_reason == "结束"
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc ", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       st.integers(1, 3))
def test_streamed_text_is_final_prefix_and_stops_at_first_match(tiny_tok, text, stops, chunk):
    seq, deltas = run(tiny_tok, byte_ids(text), chunk=chunk, stop=stops)
    # oracle, character by character: stop at the first position where some stop string ends
    want, reason = text, None
    for e in range(1, len(text) + 1):
        hits = [s for s in stops if text[:e].endswith(s)]
        if hits:
            s = max(hits, key=len)
            want, reason = text[:e - len(s)], s
            break
    assert seq.text == "".join(deltas) == want
    assert seq.stop_reason == reason
    for s in stops:
        assert s not in seq.text


def test_eos_and_stop_token_ids(tiny_tok):
    ids = byte_ids("ab") + [EOS] + byte_ids("cd")
    seq, _ = run(tiny_tok, ids)
    assert (seq.text, seq.finish_reason, seq.stop_reason, seq.token_ids) == ("ab", "stop", None, ids[:3])
    seq, _ = run(tiny_tok, ids, ignore_eos=True)
    assert seq.text == "abcd" and seq.finish_reason == "abort"
    seq, _ = run(tiny_tok, byte_ids("ab") + [771, 99], stop_token_ids=[771])
    assert (seq.text, seq.stop_reason) == ("ab", 771)
    seq, _ = run(tiny_tok, byte_ids("ab") + [771, 99], stop_token_ids=[771], include_stop_str_in_output=True,
                 skip_special_tokens=False)
    assert seq.text == "ab <|im_user|>"


def test_min_tokens_delays_every_stop(tiny_tok):
    ids = byte_ids("xy") + [EOS] + byte_ids("zSTOPw") + [EOS]
    seq, _ = run(tiny_tok, ids, min_tokens=3)
    assert seq.token_ids == ids[:3]  # the 3rd token may stop
    seq, _ = run(tiny_tok, ids, min_tokens=4, stop=["xy"])
    assert seq.text == "xyzSTOPw" and seq.stop_reason is None and len(seq.token_ids) == len(ids)
    seq, _ = run(tiny_tok, byte_ids("STOPSTOP"), min_tokens=5, stop=["STOP"])
    assert seq.text == "STOP" and seq.stop_reason == "STOP"  # the first match ended before min_tokens


def test_length_and_multi_token_steps(tiny_tok):
    seq, deltas = run(tiny_tok, byte_ids("abcdef"), max_tokens=4)
    assert seq.text == "abcd" and seq.finish_reason == "length"
    seq = SequenceOutput(SamplingParams(max_tokens=None, stop=["cd"]), tiny_tok, [EOS])
    d = seq.append(byte_ids("abcdef"))
    assert d.finished and d.text == "ab" and d.token_ids == byte_ids("abcd")
    # an incomplete character at the length limit is flushed like a full decode would show it
    seq, _ = run(tiny_tok, list("😀".encode())[:2] + [97], max_tokens=2)
    assert seq.text == "\ufffd" and seq.finish_reason == "length"
    with pytest.raises(RuntimeError):
        seq.append([97])


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValidationError, match="need detokenization"):
        SequenceOutput(SamplingParams(stop=["x"]), None)
    seq = SequenceOutput(SamplingParams(max_tokens=2), None, [EOS])
    assert seq.append([5]).text == "" and seq.append([6]).finish_reason == "length"
