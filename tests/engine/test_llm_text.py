"""Text through the engine (tiny model, CPU): LLM.chat, streamed text that only grows and joins to the full
decode (multi-byte characters split across tokens), stop strings that never leak (split across tokens,
include_stop_str_in_output, streamed), held-back text flushed on abort, and process_inputs that never
mutates the caller's SamplingParams and can run on another thread while the engine steps."""

from __future__ import annotations

import shutil
import threading

import pytest
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams
from kimi_linear.errors import ValidationError
from kimi_linear.loader.chat_template import apply_chat_template
from kimi_linear.sampling_params import StructuredOutputsParams

KW = dict(device="cpu", dtype="float32", max_model_len=96, max_num_seqs=4, max_num_batched_tokens=24, block_size=8)
MULTIBYTE = "(数据|😀|é| ok){10}"  # a regex forcing characters of 2 to 4 bytes, split over byte tokens


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), **KW)


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def stream(llm, prompts, params) -> dict[str, list]:
    """Run requests with stream=True; request id -> the list of its RequestOutputs in order."""
    eng = llm.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"s{i}", p, sp, stream=True)
    seen: dict[str, list] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o)
    return seen


def assert_append_only(outs) -> None:
    for c in range(len(outs[-1].outputs)):
        texts = [o.outputs[c].text for o in outs]
        for a, b in zip(texts, texts[1:]):
            assert b.startswith(a), f"streamed text shrank or changed: {a!r} -> {b!r}"


# ---------------------------------------------------------------- chat
def test_chat_renders_the_template_and_generates(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = llm.chat(conv, greedy(6), use_tqdm=False)
    assert len(out) == 1
    text = apply_chat_template(tok, conv, add_generation_prompt=True)
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert out[0].prompt == text and out[0].prompt_token_ids == tok.encode(text)
    direct = llm.generate({"prompt_token_ids": tok.encode(text)}, greedy(6), use_tqdm=False)[0]
    assert out[0].outputs[0].token_ids == direct.outputs[0].token_ids
    # several conversations: one output each, in order; the same first conversation gives the same tokens
    many = llm.chat([conv, [{"role": "user", "content": "Another one"}]], greedy(6), use_tqdm=False)
    assert len(many) == 2 and many[0].outputs[0].token_ids == direct.outputs[0].token_ids
    assert many[1].prompt.startswith("<|im_user|>user<|im_middle|>Another one")
    cont = llm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}], greedy(3),
                    continue_final_message=True, use_tqdm=False)[0]
    assert cont.prompt.endswith("Hello, I")
    tmpl = llm.chat(conv, greedy(2), chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}",
                    use_tqdm=False)[0]
    assert tmpl.prompt == "[Be brief.][Hi there]"


def test_chat_errors(llm, tiny_checkpoint, tmp_path):
    with pytest.raises(ValidationError) as e:
        llm.chat([{"role": "wizard", "content": "x"}], greedy(), use_tqdm=False)
    assert e.value.param == "messages"
    with pytest.raises(ValidationError) as e:
        llm.chat([], greedy(), use_tqdm=False)
    assert e.value.param == "messages"
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        shutil.copy(tiny_checkpoint / f, tmp_path / f)
    for f in tiny_checkpoint.glob("*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    bare = LLM(str(tmp_path), **KW)
    assert bare.get_tokenizer() is None
    with pytest.raises(ValidationError, match="needs a tokenizer") as e:
        bare.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False)
    assert e.value.param == "messages"
    with pytest.raises(ValidationError, match="stop strings need detokenization") as e:
        bare.generate({"prompt_token_ids": [1, 2]}, greedy(stop=["x"]), use_tqdm=False)
    assert e.value.param == "stop"
    with pytest.raises(ValidationError, match="bad_words need a tokenizer") as e:
        bare.generate({"prompt_token_ids": [1, 2]}, greedy(bad_words=["x"]), use_tqdm=False)
    assert e.value.param == "bad_words"
    assert_pools_empty(bare)


# ---------------------------------------------------------------- streamed text
def test_streamed_multibyte_text_joins_to_the_full_decode(llm):
    tok = llm.get_tokenizer()
    so = StructuredOutputsParams(regex=MULTIBYTE)
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=16, structured_outputs=so) for s in range(3)]
    seen = stream(llm, ["Write:", "More", "x"], params)
    split = 0
    for outs in seen.values():
        assert_append_only(outs)
        final = outs[-1].outputs[0]
        assert final.finish_reason in ("stop", "length")
        assert final.text == tok.decode(final.token_ids, skip_special_tokens=True)
        assert all("\ufffd" not in o.outputs[0].text for o in outs[:-1])  # never half a character
        split += sum("\ufffd" in tok.decode([t]) for t in final.token_ids)
    assert split > 0, "no token held part of a character: the test does not exercise splitting"
    assert_pools_empty(llm)


def test_stop_string_split_across_tokens_never_leaks(llm):
    tok = llm.get_tokenizer()
    prompt = "The state of"
    base = llm.generate(prompt, greedy(16, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = base.text
    # a stop string spanning a token boundary: starts inside one token's text and ends in a later one
    # (each prefix decoded whole, special ids skipped as in the output: a token may end inside a UTF-8
    # character that the next one completes)
    bounds = [len(tok.decode(base.token_ids[:i + 1], skip_special_tokens=True)) for i in range(len(base.token_ids))]
    cut = next((b for b in bounds[2:] if 1 <= b < len(text) - 1 and text.find(text[b - 1:b + 2]) == b - 1), None)
    assert cut is not None, (text, bounds, base.token_ids)
    stop = text[cut - 1:cut + 2]
    want = text[:cut - 1]
    seen = stream(llm, [prompt, prompt], [greedy(16, ignore_eos=True, stop=[stop]),
                                          greedy(16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)])
    plain, incl = seen["s0"], seen["s1"]
    for outs, full in ((plain, want), (incl, want + stop)):
        assert_append_only(outs)
        assert outs[-1].outputs[0].finish_reason == "stop" and outs[-1].outputs[0].stop_reason == stop
        assert all(full.startswith(o.outputs[0].text) for o in outs)  # no streamed step shows a stop character
        assert outs[-1].outputs[0].text == full
    # the token that completed the stop string is kept in token_ids (as vLLM does)
    n = len(plain[-1].outputs[0].token_ids)
    assert base.token_ids[:n] == plain[-1].outputs[0].token_ids
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert len(dec(base.token_ids[:n])) >= cut + 2 > len(dec(base.token_ids[:n - 1]))
    # the offline API gives the same final text
    same = llm.generate(prompt, greedy(16, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert same.text == want and same.stop_reason == stop
    assert_pools_empty(llm)


def test_held_back_text_is_flushed_on_length_and_abort(llm):
    tok = llm.get_tokenizer()
    prompt = "The state of"
    base = llm.generate(prompt, greedy(10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = tok.decode(base.token_ids[:1])
    eng = llm.llm_engine
    # the whole output is a proper prefix of the stop string: held back until the length finish releases it
    seen = stream(llm, [prompt], [greedy(10, ignore_eos=True, stop=[base.text + "\x00"])])["s0"]
    assert [o.outputs[0].text for o in seen[:-1]] == [""] * (len(seen) - 1)
    assert seen[-1].outputs[0].finish_reason == "length" and seen[-1].outputs[0].text == base.text
    # aborted while its first token's text is held back: the abort output carries it
    eng.add_request("cut", prompt, greedy(10, ignore_eos=True, stop=[first + "\x00"]), stream=True)
    outs = []
    while not outs:
        outs = eng.step()
    assert outs[0].outputs[0].text == "" and len(outs[0].outputs[0].token_ids) == 1
    eng.abort_request("cut")
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    assert outs[-1].outputs[0].finish_reason == "abort" and outs[-1].outputs[0].text == first
    assert_pools_empty(llm)


def test_eos_and_stop_id_text_left_out_unless_asked(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Hello", greedy(8, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    sid = base.token_ids[3]
    out = llm.generate("Hello", greedy(8, ignore_eos=True, stop_token_ids=[sid]), use_tqdm=False)[0].outputs[0]
    k = base.token_ids.index(sid)
    assert out.token_ids == base.token_ids[:k + 1] and out.stop_reason == sid
    # outputs skip special tokens' text by default (skip_special_tokens=True, as vLLM)
    assert out.text == tok.decode(base.token_ids[:k], skip_special_tokens=True)
    inc = llm.generate("Hello", greedy(8, ignore_eos=True, stop_token_ids=[sid], include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert inc.text == tok.decode(base.token_ids[:k + 1], skip_special_tokens=True)


# ---------------------------------------------------------------- process_inputs
def test_process_inputs_never_mutates_the_callers_params(llm):
    sp = greedy(4, bad_words=["the"])
    before = repr(sp), sp.bad_words_token_ids
    p = llm.llm_engine.process_inputs("hello", sp)
    assert (repr(sp), sp.bad_words_token_ids) == before and sp.bad_words_token_ids is None
    assert p.params is not sp and p.params.bad_words_token_ids
    q = llm.llm_engine.process_inputs("hello", greedy(4))
    assert q.params.bad_words_token_ids is None


def test_process_inputs_from_another_thread_while_stepping(llm):
    eng = llm.llm_engine
    params = greedy(12, ignore_eos=True, stop=["zz"], bad_words=["the"])
    ref = llm.generate([{"prompt_token_ids": [5, 6, 7]}, "another"], params, use_tqdm=False)
    errors, done = [], threading.Event()

    def hammer():
        try:
            while not done.is_set():
                eng.process_inputs("some text", params)
                eng.process_inputs({"prompt_token_ids": [1, 2, 3]},
                                   greedy(2, structured_outputs=StructuredOutputsParams(choice=["a", "b"])))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        again = llm.generate([{"prompt_token_ids": [5, 6, 7]}, "another"], params, use_tqdm=False)
    finally:
        done.set()
        t.join()
    assert not errors, errors
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in ref]
    assert_pools_empty(llm)
