"""Async scheduling (one step in flight, `engine/overlap.py`) gives the same tokens, finish reasons, stop
reasons, texts and logprobs as synchronous stepping, on the tiny model (CPU, fp32: the same code path as
CUDA without the concurrency): greedy and seeded sampling, many requests with different max_tokens, stop
strings and stop ids finishing at different steps, preemption, a chunked long prompt beside decodes, an
abort mid-stream, logprobs and prompt logprobs, and the batches that fall back to one step at a time
(penalties, bad_words, structured output). The pools end empty: a discarded speculative token frees what
it used. On CUDA (the `gpu` params) the same tests run with graphs."""

from __future__ import annotations

import pytest
import torch
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams
from kimi_linear.engine.config import EngineConfig

# a cache small enough to preempt, a budget small enough to chunk prompts and mix prefill with decodes
KW = dict(dtype="float32", max_model_len=96, max_num_seqs=5, max_num_batched_tokens=16, block_size=8,
          num_gpu_blocks_override=14, num_state_slots_override=5)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def llms(tiny_checkpoint, request):
    """Both modes on one device; on CUDA with graphs: real concurrency, stream-ordered reuse of freed blocks."""
    out = {mode: LLM(str(tiny_checkpoint), device=request.param, async_scheduling=mode == "async", **KW)
           for mode in ("sync", "async")}
    yield out
    for llm in out.values():
        llm.shutdown()


def prompts(vocab: int, lengths, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def summary(outs) -> list:
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]


def generate_both(llms, ps, params) -> dict:
    """Run the same prompts in both modes; returns mode -> (outputs, stats delta)."""
    res = {}
    for mode, llm in llms.items():
        before = llm.llm_engine.stats()
        outs = llm.generate(ps, params, use_tqdm=False)
        after = llm.llm_engine.stats()
        assert_pools_empty(llm)
        assert llm.llm_engine._inflight is None
        res[mode] = (outs, {k: getattr(after, k) - getattr(before, k) for k in
                            ("num_preemptions", "num_overlapped_steps", "num_steps")})
    assert res["sync"][1]["num_overlapped_steps"] == 0
    return res


def assert_same(res) -> None:
    assert summary(res["async"][0]) == summary(res["sync"][0])


def test_config_knob(tiny_checkpoint):
    assert EngineConfig.defaults()["async_scheduling"] is True  # on: measured on the H200 (RESULTS.md)
    from kimi_linear.errors import ConfigError

    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineConfig(str(tiny_checkpoint), async_scheduling="yes")


def test_cli_flag():
    import argparse

    from kimi_linear.cli.engine_args import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).async_scheduling is True
    assert p.parse_args(["--async-scheduling"]).async_scheduling is True
    assert p.parse_args(["--no-async-scheduling"]).async_scheduling is False


def test_greedy_under_pressure(llms):
    """16 prompts, max_tokens 3..10: chunked prefill, mixed batches, preemption, requests finishing every step."""
    ps = prompts(llms["sync"].llm_engine.vocab_size, [1, 2, 3, 5, 8, 10, 13, 16, 19, 22, 26, 30, 34, 38, 41, 50])
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 8, ignore_eos=True) for i in range(len(ps))]
    res = generate_both(llms, ps, params)
    assert_same(res)
    for mode in res:
        assert res[mode][1]["num_preemptions"] > 0, mode
    assert res["async"][1]["num_overlapped_steps"] > 0


def test_seeded_sampling_and_n(llms):
    ps = prompts(llms["sync"].llm_engine.vocab_size, [4, 9, 17, 6], seed=1)
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7 + i, max_tokens=6 + 2 * i,
                             n=2 if i == 1 else 1, ignore_eos=True) for i in range(len(ps))]
    res = generate_both(llms, ps, params)
    assert_same(res)
    assert res["async"][1]["num_overlapped_steps"] > 0


def test_stop_strings_and_ids_finish_at_different_steps(llms):
    """Stops found from the tokens (stop ids, EOS) and from the text (stop strings), at different steps: the
    async engine computes one discarded token after each and still reports the same outputs."""
    ps = prompts(llms["sync"].llm_engine.vocab_size, [5, 7, 9, 11, 13], seed=2)
    free = llms["sync"].generate(ps, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True), use_tqdm=False)
    params = []
    for i, o in enumerate(free):
        toks, text = o.outputs[0].token_ids, o.outputs[0].text
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[toks[2 + i]]))
        elif i % 3 == 1 and len(text) > 6:
            params.append(SamplingParams(temperature=0, max_tokens=14, stop=[text[3 + i:5 + i]],
                                         include_stop_str_in_output=i == 4))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=4 + i, min_tokens=2))
    res = generate_both(llms, ps, params)
    assert_same(res)
    reasons = {c.finish_reason for o in res["async"][0] for c in o.outputs}
    assert "stop" in reasons, summary(res["async"][0])


def test_long_prompt_chunked_beside_decodes(llms):
    """A long prompt arrives while short requests decode: its chunks share steps with their decodes."""
    vocab = llms["sync"].llm_engine.vocab_size
    short = prompts(vocab, [3, 4, 5], seed=3)
    long = prompts(vocab, [70], seed=4)[0]
    out = {}
    for mode, llm in llms.items():
        eng = llm.llm_engine
        before = eng.scheduler.stats.num_mixed_steps, eng.scheduler.stats.num_chunked_prefills
        for i, p in enumerate(short):
            eng.add_request(f"{mode}-s{i}", p, SamplingParams(temperature=0, max_tokens=12 + i, ignore_eos=True))
        for _ in range(3):
            eng.step()
        eng.add_request(f"{mode}-long", long, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                             logprobs=3, prompt_logprobs=2))
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id.split("-", 1)[1]] = o
        s = eng.scheduler.stats
        assert s.num_mixed_steps > before[0] and s.num_chunked_prefills > before[1]
        assert_pools_empty(llm)
        out[mode] = done
    assert summary(out["async"].values()) == summary(out["sync"].values())
    a, b = out["async"]["long"], out["sync"]["long"]
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        assert all(x[k].logprob == pytest.approx(y[k].logprob, abs=1e-5) and x[k].rank == y[k].rank for k in x)
    for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        assert x.keys() == y.keys()
        assert all(x[k].logprob == pytest.approx(y[k].logprob, abs=1e-5) and x[k].rank == y[k].rank for k in x)


def test_abort_mid_stream(llms):
    """Aborted after its k-th streamed token, a request ends with exactly the tokens streamed (async drops the
    token in flight), and the other requests are unaffected."""
    ps = prompts(llms["sync"].llm_engine.vocab_size, [6, 8, 10], seed=5)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llms["sync"].generate(ps, sp, use_tqdm=False)
    for mode, llm in llms.items():
        eng = llm.llm_engine
        for i, p in enumerate(ps):
            eng.add_request(f"{mode}-a{i}", p, sp, stream=True)
        seen, final = {}, {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                i = int(o.request_id[-1])
                seen[i] = list(o.outputs[0].token_ids)
                if o.finished:
                    final[i] = o.outputs[0]
                elif i == 1 and len(seen[i]) >= 4:
                    eng.abort_request(o.request_id)
        assert final[1].finish_reason == "abort" and final[1].token_ids == seen[1]
        assert 4 <= len(final[1].token_ids) < 12
        assert final[1].token_ids == full[1].outputs[0].token_ids[:len(final[1].token_ids)]
        for i in (0, 2):
            assert final[i].token_ids == full[i].outputs[0].token_ids and final[i].finish_reason == "length"
        assert_pools_empty(llm)


def test_host_token_batches_fall_back_and_agree(llms):
    """Penalties and bad_words need the previous tokens on the host: those steps run one at a time (fewer
    overlapped steps), and the tokens still agree."""
    ps = prompts(llms["sync"].llm_engine.vocab_size, [5, 7, 9], seed=6)
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, frequency_penalty=1.0,
                             bad_words_token_ids=[[7, 9], [11]]),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={5: 3.0})]
    res = generate_both(llms, ps, params)
    assert_same(res)
    assert res["async"][1]["num_overlapped_steps"] < res["async"][1]["num_steps"] // 2
    alone = generate_both(llms, ps[2:], params[2:])
    assert alone["async"][1]["num_overlapped_steps"] > 0


def test_structured_output_falls_back_and_agrees(llms):
    """A grammar must accept each token before the next bitmask: its steps run one at a time, same tokens."""
    from kimi_linear.sampling_params import StructuredOutputsParams

    ps = prompts(llms["sync"].llm_engine.vocab_size, [4, 6], seed=7)
    grammar = StructuredOutputsParams(regex="(ab|c){3,5}")
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=grammar),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    res = generate_both(llms, ps, params)
    assert_same(res)
    assert res["async"][0][0].outputs[0].finish_reason == "stop"


# --------------------------------------------------------------------------- host buffers vs queued copies
# On CUDA the host runs a step ahead of the device, so a copy from host memory may still be queued when the
# host prepares the next step. These CPU tests check the buffer discipline with fake events.

class _CopyEvent:
    """A fake CUDA event after the asynchronous copy from `host`: the copy reads `host` only when the device
    gets to it, which is at the latest when `synchronize()` returns; until then `host` must not change."""

    def __init__(self, host: torch.Tensor):
        self.host, self.pending, self.expected = host, False, None

    def record(self):
        assert not self.pending, "a new copy from the host buffer before the previous one was waited for"
        self.pending, self.expected = True, self.host.clone()

    def synchronize(self):
        if self.pending:
            assert torch.equal(self.host, self.expected), "host buffer rewritten while its copy was queued"
        self.pending = False


def test_decode_host_buffer_waits_for_its_copy():
    from kimi_linear.engine.cuda_graph import ROW_INPUT_IDS, DecodeRunner

    dr = DecodeRunner(None, None, None, max_batch=4, max_seq_len=32, device=torch.device("cpu"))
    dr._copied = _CopyEvent(dr.host)
    dr.load([5, 6], [0, 1], [3, 9], [4, 10])
    dr.load([7, 8, 9], [0, 1, 2], [4, 10, 17], [5, 11, 2])  # waits for the first copy before rewriting
    assert dr.packed[ROW_INPUT_IDS, :3].tolist() == [7, 8, 9]
    dr.host[0, 0] = 1  # a write without waiting is what the fake catches
    with pytest.raises(AssertionError, match="rewritten"):
        dr._copied.synchronize()


def test_readback_waits_for_its_event():
    from types import SimpleNamespace

    from kimi_linear.engine.model_runner import PendingSample
    from kimi_linear.engine.sampler import SamplerOutput

    reqs = [SimpleNamespace(request_id=r, sampling_params=SimpleNamespace(logprobs=None)) for r in "ab"]
    so = SamplerOutput(token_ids=torch.tensor([3, 4]), logprobs=torch.tensor([-0.5, -1.0]))
    ps = PendingSample(reqs, so, torch.tensor([True, False]), torch.device("cpu"))
    waited = []
    ps._event = SimpleNamespace(synchronize=lambda: waited.append(True))
    ints = ps._ints

    class Guarded:  # the pinned destination: readable only after the event
        def tolist(self):
            assert waited, "read the pinned readback before its event completed"
            return ints.tolist()

    ps._ints = Guarded()
    res = ps.results()
    assert [res[r].token_id for r in "ab"] == [3, 4] and [res[r].is_finite for r in "ab"] == [True, False]
    assert ps.results() is res and waited == [True]  # read once, kept


def test_bitmask_buffer_refill_never_reaches_a_queued_step():
    """The grammar bitmask of step t+1 is filled on the host while step t's may still be queued: each step
    gets its own device copy of the cached host buffer."""
    from types import SimpleNamespace

    from kimi_linear.engine.model_runner import ModelRunner

    class Matcher:
        def __init__(self, word):
            self.word = word

        def fill_bitmask(self, bitmask, i):
            bitmask[i] = self.word

    runner = SimpleNamespace(_bitmask=None, max_num_seqs=3, device=torch.device("cpu"),
                             model_config=SimpleNamespace(vocab_size=70))
    first = ModelRunner._fill_bitmask(runner, [SimpleNamespace(matcher=Matcher(5)), SimpleNamespace(matcher=None)])
    assert first.tolist() == [[5] * 3, [-1] * 3]
    second = ModelRunner._fill_bitmask(runner, [SimpleNamespace(matcher=Matcher(9))])
    assert second.tolist() == [[9] * 3]
    assert first.tolist() == [[5] * 3, [-1] * 3]  # the refill did not change the earlier step's mask
    assert first.data_ptr() != runner._bitmask.data_ptr()


def test_steps_count_model_runs_only(llms):
    """A 40-token prompt under a 16-token budget is 3 chunks in either mode. With async scheduling the first
    `step()` launches two chunks and the last one schedules nothing (it reads the token back): `num_steps`
    counts the 3 model runs in both modes, not the empty schedule."""
    for mode, llm in llms.items():
        eng = llm.llm_engine
        before = eng.stats().num_steps
        eng.add_request(f"count-{mode}", prompts(eng.vocab_size, [40])[0],
                        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        calls = 0
        while eng.has_unfinished_requests():
            eng.step()
            calls += 1
        assert eng.stats().num_steps - before == 3, mode
        assert calls == 3, mode
        assert_pools_empty(llm)
