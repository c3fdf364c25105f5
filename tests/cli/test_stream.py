"""`LLM.stream` / `LLM.chat_stream`, the streaming API the offline CLI commands run on: cumulative outputs
that end finished and equal `generate`'s, and an early close that aborts and frees the cache."""

from __future__ import annotations

import pytest

from kimi_linear.llm import LLM
from kimi_linear.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    m = LLM(str(tiny_checkpoint), device="cpu", max_model_len=128, max_num_seqs=2)
    yield m
    m.shutdown()


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_stream_is_cumulative_and_matches_generate(llm):
    outs = list(llm.stream("Kimi Linear is", greedy(5)))
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == sorted(lens) and lens[-1] == 5 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    ref = llm.generate(["Kimi Linear is"], greedy(5), use_tqdm=False)[0].outputs[0]
    assert outs[-1].outputs[0].token_ids == ref.token_ids and outs[-1].outputs[0].text == ref.text


def test_chat_stream_matches_chat(llm):
    msgs = [{"role": "user", "content": "Hello"}]
    last = list(llm.chat_stream(msgs, greedy(4)))[-1]
    assert last.outputs[0].token_ids == llm.chat(msgs, greedy(4), use_tqdm=False)[0].outputs[0].token_ids


def test_closing_a_stream_aborts_and_frees(llm):
    gen = llm.stream({"prompt_token_ids": [1, 2, 3]}, greedy(50))
    next(gen)
    next(gen)
    gen.close()
    s = llm.llm_engine.stats()
    assert not llm.llm_engine.has_unfinished_requests()
    assert s.num_running == s.num_waiting == s.num_blocks_used == s.num_slots_used == 0


def test_stream_validates_before_queueing(llm):
    from kimi_linear.errors import ValidationError

    with pytest.raises(ValidationError) as e:
        next(llm.stream({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1000)))
    assert e.value.param == "max_tokens"
    assert not llm.llm_engine.has_unfinished_requests()
