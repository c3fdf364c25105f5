"""LLM.generate (greedy) equals transformers==5.23.0 `generate(do_sample=False)`, one prompt at a time, on
a checkpoint written by transformers' own KimiLinearForCausalLM.save_pretrained (no tokenizer files:
token-id prompts, outputs with token ids and empty text). Both stop at the checkpoint's eos."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from models.test_hf_parity import CONFIGS, write_hf_checkpoint  # noqa: E402

from kimi_linear import LLM, SamplingParams  # noqa: E402

LENGTHS = [1, 9, 22, 37]
MAX_NEW = 8


@pytest.mark.parametrize("name", ["A", "B"])
def test_greedy_matches_transformers_generate(tmp_path, name):
    hf = write_hf_checkpoint(tmp_path, CONFIGS[name], seed=ord(name))
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(ord(name))
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in LENGTHS]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
            expected.append(seq[0, len(p):].tolist())

    llm = LLM(str(tmp_path), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=3,
              max_num_batched_tokens=16, block_size=8)
    assert llm.get_tokenizer() is None
    assert 2 in llm.llm_engine.eos_token_ids  # transformers' eos, from config.json / generation_config.json
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    for p, o, want in zip(prompts, outs, expected):
        c = o.outputs[0]
        assert c.token_ids == want, f"config {name}, prompt of {len(p)} tokens: {c.token_ids} != {want}"
        assert c.text == ""
        assert c.finish_reason == ("stop" if want[-1] == 2 else "length")
    stats = llm.llm_engine.scheduler.stats
    assert stats.num_chunked_prefills > 0 and stats.num_mixed_steps > 0
