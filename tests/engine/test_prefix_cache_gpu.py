"""Prefix caching on CUDA with the decode path in CUDA graphs (fp32, tiny model): a three-turn chat and a
shared system prompt give the same greedy tokens with the cache on and off, the hits are real, and the
snapshot copies around graph replays leave nothing owned."""

from __future__ import annotations

import gc

import pytest
import torch
from test_prefix_cache import assert_nothing_owned, ids, tokens

from kimi_linear import LLM, SamplingParams

pytestmark = pytest.mark.gpu

KW = dict(device="cuda", dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, block_size=8)


def workload(llm: LLM) -> list:
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs, prompt = [], tokens(21, seed=1)
    for turn in range(3):  # decode boundaries are crossed inside graph replays; turn t + 1 hits their snapshot
        out = llm.generate(ids(prompt), sp, use_tqdm=False)[0]
        outs.append(out)
        prompt = prompt + out.outputs[0].token_ids + tokens(5, seed=10 + turn)
    system = tokens(19, seed=2)
    outs += llm.generate([ids(system + tokens(2 + i, seed=20 + i)) for i in range(6)], sp, use_tqdm=False)
    return outs


def test_cache_on_equals_off_with_cuda_graphs(tiny_checkpoint):
    results = {}
    for on in (True, False):
        llm = LLM(str(tiny_checkpoint), enable_prefix_caching=on, **KW)
        assert llm.llm_engine.runner.decode.graphs
        results[on] = workload(llm)
        assert_nothing_owned(llm)
        if on:
            assert llm.llm_engine.runner.decode.num_replays > 0
            assert [o.num_cached_tokens > 0 for o in results[on][1:3]] == [True, True]
        llm.shutdown()
        gc.collect()
        torch.cuda.empty_cache()
    for a, b in zip(results[True], results[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            t = next(iter(db))
            assert abs(da[t].logprob - db[t].logprob) < 1e-3
