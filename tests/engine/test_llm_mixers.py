"""The engine serves every token mixer kind unchanged: on a tiny model with KDA, GDN and MLA layers
(`linear_attn_config.gdn_layers`), greedy LLM.generate equals the model's own step-by-step greedy decode
(SequenceCache), for prompts submitted together under a budget and a cache small enough to force chunked
prefill, mixed batches and preemption (the pattern of test_llm_reference.py, fewer prompts)."""

from __future__ import annotations

import pytest
import torch
from test_llm_reference import assert_pools_empty, make_prompts, reference_greedy

from kimi_linear import LLM, SamplingParams
from kimi_linear.tools.create import create_checkpoint
from kimi_linear.tools.presets import preset_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = preset_config("tiny")  # 1-based layers 1-3 linear attention, 4 full attention
    d["linear_attn_config"]["gdn_layers"] = [2]
    path = tmp_path_factory.mktemp("mixers")
    create_checkpoint(path, d, seed=3, tokenizer=False, progress=False)
    return LLM(str(path), device="cpu", dtype="float32", max_model_len=48, max_num_seqs=3,
               max_num_batched_tokens=16, block_size=8, num_gpu_blocks_override=6)


def test_all_mixer_kinds_generate_like_the_reference(llm):
    assert llm.llm_engine.runner.model.config.layer_types == ("kda", "gdn", "kda", "mla")
    model = llm.llm_engine.runner.model
    prompts = make_prompts(model.config.vocab_size, seed=2)[6::3]  # 4 prompts of 10 to 41 tokens
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 2, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (o, p, sp) in enumerate(zip(outs, prompts, params)):
        with torch.no_grad():
            ref = reference_greedy(model, p, sp.max_tokens)
        assert o.outputs[0].token_ids == ref, f"prompt {i} ({len(p)} tokens): {o.outputs[0].token_ids} != {ref}"
    assert_pools_empty(llm)
    stats = llm.llm_engine.scheduler.stats
    assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0 and stats.num_mixed_steps > 0, stats
