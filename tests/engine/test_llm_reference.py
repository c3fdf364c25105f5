"""Greedy LLM.generate equals the reference model (KimiLinearForCausalLM + SequenceCache, one prompt at
a time), token for token, for 16 prompts submitted together under a budget and a cache small enough
to force chunked prefill, mixed prefill/decode batches and preemption; the pools end empty."""

from __future__ import annotations

import pytest
import torch

from kimi_linear import LLM, SamplingParams, SequenceCache

LENGTHS = [1, 2, 3, 4, 6, 8, 10, 13, 16, 19, 22, 26, 30, 34, 38, 41]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    cache = SequenceCache(model.config, 1, device=next(model.parameters()).device,
                          dtype=next(model.parameters()).dtype, block_size=16)
    logits = model(torch.tensor([prompt], device=cache.device), cache)
    out = []
    while True:
        out.append(int(logits[0, -1].argmax()))
        if len(out) == max_tokens:
            return out
        logits = model(torch.tensor([[out[-1]]], device=cache.device), cache)


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def assert_pools_empty(llm: LLM) -> None:
    s = llm.llm_engine.scheduler
    assert not s.running and not s.waiting and not s.requests
    assert s.block_pool.num_free == s.block_pool.num_blocks, "MLA blocks still held"
    assert all(s.block_pool.ref_count(b) == 0 for b in range(s.block_pool.num_blocks))
    assert s.state_pool.num_free == s.state_pool.num_slots, "KDA state slots still held"


def run_equality_check(llm: LLM, use_tqdm: bool = False):
    """Generate for the 16 prompts and compare with the reference; returns the scheduler stats."""
    model = llm.llm_engine.runner.model
    prompts = make_prompts(model.config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 6, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=use_tqdm)
    assert [o.prompt_token_ids for o in outs] == prompts  # input order
    for i, (o, p, sp) in enumerate(zip(outs, prompts, params)):
        ref = reference_greedy(model, p, sp.max_tokens)
        got = o.outputs[0].token_ids
        assert got == ref, f"prompt {i} ({len(p)} tokens, {o.num_preemptions} preemptions): {got} != {ref}"
        assert o.finished and o.outputs[0].finish_reason == "length"
        tok = llm.get_tokenizer()
        assert o.outputs[0].text == (tok.decode(got, skip_special_tokens=True) if tok is not None else "")
    assert_pools_empty(llm)
    return llm.llm_engine.scheduler.stats


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=5,
               max_num_batched_tokens=20, block_size=8, num_gpu_blocks_override=12)


def test_greedy_matches_reference_under_pressure(llm):
    stats = run_equality_check(llm)
    assert stats.num_preemptions > 0, stats
    assert stats.num_chunked_prefills > 0, stats
    assert stats.num_mixed_steps > 0, stats
    assert stats.max_running == 5, stats
    assert llm.llm_engine.runner.decode.num_eager > 0  # the padded decode path ran (CPU: no graphs)


def test_batch_of_one_equals_mixed_batch(llm):
    """The same prompt alone and inside a crowd gives the same greedy tokens."""
    prompts = make_prompts(llm.llm_engine.vocab_size, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    crowd = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for i in (0, 7, 15):
        alone = llm.generate({"prompt_token_ids": prompts[i]}, sp, use_tqdm=False)
        assert alone[0].outputs[0].token_ids == crowd[i].outputs[0].token_ids
    assert_pools_empty(llm)
