"""Stopping without a model: stop strings never leak (output side, `SequenceOutput`), and the token-id
rules (`engine/request.py`: EOS, stop ids, min_tokens, length) feeding the output side through the
engine's per-token flow (`generate`: `Request.check_stop`, then `TextProcessor.on_token`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_linear.engine.outputs import TextProcessor
from kimi_linear.engine.request import Request, RequestStatus, ids_to_mask, may_stop, stop_ids
from kimi_linear.engine.stop_checker import SequenceOutput
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams

EOS = 770
SAMPLE = SimpleNamespace(logprob=0.0, top=None, rank=None)  # what the runner reports per token


def byte_ids(text: str) -> list[int]:
    return list(text.encode())  # ids 0..255 are the single bytes: one token per byte


def run(tok, ids, chunk=1, **kw):
    """The output side alone: feed `ids` `chunk` at a time; "abort" if no stop string ended it."""
    seq = SequenceOutput(SamplingParams(**{"max_tokens": None, **kw}), tok)
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


def generate(tok, ids, max_model_len=10**6, **kw):
    """The engine's per-token flow for one sequence: the scheduler side appends the token and applies the
    token-id rules (`Request.check_stop`), then the output side (`TextProcessor`) turns it into text and may
    find a stop string, which finishes the request (as `LLMEngine._finish` does). -> (request, completion)."""
    req = Request("r", [1], SamplingParams(**{"max_tokens": None, **kw}), frozenset({EOS}))
    proc = TextProcessor(req, tok)
    for t in ids:
        req.append_token(t)
        req.check_stop(max_model_len)
        stop = proc.on_token(t, SAMPLE)
        if stop is not None:
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if req.is_finished:
            break
    return req, proc.completion()


def test_eos_and_stop_token_ids(tiny_tok):
    ids = byte_ids("ab") + [EOS] + byte_ids("cd")
    _, c = generate(tiny_tok, ids)
    assert (c.text, c.finish_reason, c.stop_reason, c.token_ids) == ("ab", "stop", None, ids[:3])
    _, c = generate(tiny_tok, ids, ignore_eos=True)
    assert c.text == "abcd" and c.finish_reason is None
    _, c = generate(tiny_tok, byte_ids("ab") + [771, 99], stop_token_ids=[771])
    assert (c.text, c.finish_reason, c.stop_reason, c.token_ids) == ("ab", "stop", 771, byte_ids("ab") + [771])
    _, c = generate(tiny_tok, byte_ids("ab") + [EOS], stop_token_ids=[EOS])
    assert c.stop_reason is None  # EOS wins over a stop id equal to it ...
    _, c = generate(tiny_tok, byte_ids("ab") + [EOS], stop_token_ids=[EOS], ignore_eos=True)
    assert c.stop_reason == EOS  # ... unless EOS is ignored
    _, c = generate(tiny_tok, byte_ids("ab") + [771, 99], stop_token_ids=[771], include_stop_str_in_output=True,
                    skip_special_tokens=False)
    assert c.text == "ab <|im_user|>"
    # the output side alone: a stop token's text is left out, and what was held back is flushed
    seq = SequenceOutput(SamplingParams(max_tokens=None, stop=["bx"]), tiny_tok)
    d = seq.append(byte_ids("ab") + [771], stop_terminated=True)
    assert (d.text, d.finished, d.finish_reason, d.token_ids) == ("ab", True, "stop", byte_ids("ab") + [771])


def test_a_stop_the_token_id_rules_did_not_make_keeps_the_token_text(tiny_tok):
    # e.g. a grammar that terminates on EOS under ignore_eos: the request is "stop" but EOS is not a stop token
    req = Request("r", [1], SamplingParams(max_tokens=None, ignore_eos=True, skip_special_tokens=False),
                  frozenset({EOS}))
    proc = TextProcessor(req, tiny_tok)
    ids = byte_ids("ab") + [EOS]
    for t in ids:
        req.append_token(t)
        assert not req.check_stop(100)
        if t == EOS:
            req.status = RequestStatus.FINISHED_STOPPED
            assert not req.ended_on_stop_token
        proc.on_token(t, SAMPLE)
    assert proc.completion().text == "ab <|im_end|>"


def test_min_tokens_delays_every_stop(tiny_tok):
    ids = byte_ids("xy") + [EOS] + byte_ids("zSTOPw") + [EOS]
    _, c = generate(tiny_tok, ids, min_tokens=3)
    assert c.token_ids == ids[:3]  # the 3rd token may stop
    _, c = generate(tiny_tok, ids, min_tokens=4, stop=["xy"])
    assert c.text == "xyzSTOPw" and c.stop_reason is None and c.token_ids == ids
    _, c = generate(tiny_tok, [771, 771, 771], min_tokens=2, stop_token_ids=[771])
    assert c.token_ids == [771, 771] and c.stop_reason == 771
    _, c = generate(tiny_tok, byte_ids("STOPSTOP"), min_tokens=5, stop=["STOP"])
    assert c.text == "STOP" and c.stop_reason == "STOP"  # the first match ended before min_tokens


def test_min_tokens_mask_and_stop_rule_agree():
    p = SamplingParams(min_tokens=3, stop_token_ids=[7])
    assert stop_ids(p, {5}) == {5, 7} and stop_ids(SamplingParams(ignore_eos=True, stop_token_ids=[7]), {5}) == {7}
    for n in range(6):  # n tokens generated so far; the sampler draws token n + 1
        assert ids_to_mask(p, {5}, n) == ({5, 7} if n < 3 else set())
        assert may_stop(p, n + 1) == (n + 1 >= 3)  # the rule allows token 3 to stop: the mask is stricter
    assert ids_to_mask(SamplingParams(), {5}, 0) == set()


def test_length_and_multi_token_steps(tiny_tok):
    _, c = generate(tiny_tok, byte_ids("abcdef"), max_tokens=4)
    assert c.text == "abcd" and c.finish_reason == "length"
    _, c = generate(tiny_tok, byte_ids("abcdef"), max_model_len=4)  # prompt (1) + 3 tokens
    assert c.text == "abc" and c.finish_reason == "length"
    _, c = generate(tiny_tok, byte_ids("abcSTOP"), max_tokens=5, stop=["STOP"])
    assert c.text == "abcST" and c.finish_reason == "length"  # the held-back prefix is flushed at the cap
    _, c = generate(tiny_tok, byte_ids("abcSTOP"), max_tokens=7, stop=["STOP"])
    assert c.text == "abc" and (c.finish_reason, c.stop_reason) == ("stop", "STOP")  # a match on the last token wins
    seq = SequenceOutput(SamplingParams(max_tokens=None, stop=["cd"]), tiny_tok)
    d = seq.append(byte_ids("abcdef"))
    assert d.finished and d.text == "ab" and d.token_ids == byte_ids("abcd")
    # an incomplete character at the length limit is flushed like a full decode would show it
    _, c = generate(tiny_tok, list("😀".encode())[:2] + [97], max_tokens=2)
    assert c.text == "\ufffd" and c.finish_reason == "length"
    seq = SequenceOutput(SamplingParams(max_tokens=2), tiny_tok)
    seq.append([97])
    assert seq.finish("length").finish_reason == "length"
    with pytest.raises(RuntimeError):
        seq.append([97])


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValidationError, match="need detokenization"):
        SequenceOutput(SamplingParams(stop=["x"]), None)
    _, c = generate(None, [5, 6, 7], max_tokens=2)
    assert c.text == "" and c.finish_reason == "length" and c.token_ids == [5, 6]
