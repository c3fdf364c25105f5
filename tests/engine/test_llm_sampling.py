"""Every sampling parameter through LLM.generate on the tiny model (CPU, fp32), against naive references:
penalties and logit_bias (a greedy decode re-computed from full forwards), allowed_token_ids,
min_tokens, bad_words, top_k / top_p / min_p; seeded sampling reproducible across batch compositions
and preemption; sampled and prompt logprobs equal to the model's log_softmax (fp32, 1e-5), prompt
logprobs across chunked prefill, the decode path and preemption, never duplicated."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams
from kimi_linear.errors import ValidationError

KW = dict(device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=8,
          num_gpu_blocks_override=10)
EOS = 770


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), **KW)


def ids(*tokens):
    return {"prompt_token_ids": list(tokens)}


@torch.no_grad()
def full_logprobs(llm, tokens: list[int]) -> torch.Tensor:
    """log_softmax [T, V] (fp32) of the model's logits over `tokens`, one full forward."""
    model = llm.llm_engine.runner.model
    return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), -1)


def naive_processed(logits: torch.Tensor, prompt: list[int], out: list[int], sp: SamplingParams) -> torch.Tensor:
    x = logits.clone()
    for t, b in (sp.logit_bias or {}).items():
        x[t] += b
    r = sp.repetition_penalty
    for t in set(prompt) | set(out):
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t, c in Counter(out).items():
        x[t] -= sp.frequency_penalty * c + sp.presence_penalty
    return x


def naive_greedy(llm, prompt: list[int], sp: SamplingParams) -> list[int]:
    out: list[int] = []
    model = llm.llm_engine.runner.model
    while len(out) < sp.max_tokens:
        with torch.no_grad():
            raw = model(torch.tensor([prompt + out]))[0, -1].float()
        out.append(int(naive_processed(raw, prompt, out, sp).argmax()))
    return out


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [17, 17, 17], [100, 200, 300, 400, 500, 600, 700]]


@pytest.mark.parametrize("kw", [dict(repetition_penalty=2.0), dict(repetition_penalty=0.5),
                                dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0),
                                dict(logit_bias={42: 8.0, 7: -100.0}, presence_penalty=1.0, repetition_penalty=1.3)],
                         ids=["rep2", "rep05", "freq", "presence", "bias+mix"])
def test_penalties_and_bias_match_a_naive_greedy_decode(llm, kw):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **kw)
    outs = llm.generate([ids(*p) for p in PROMPTS], sp, use_tqdm=False)
    plain = llm.generate([ids(*p) for p in PROMPTS], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)
    changed = 0
    for p, o, base in zip(PROMPTS, outs, plain):
        assert o.outputs[0].token_ids == naive_greedy(llm, p, sp)
        changed += o.outputs[0].token_ids != base.outputs[0].token_ids
    assert changed, "the parameter changed no output: the test would not notice it being ignored"
    assert_pools_empty(llm)


def test_masks_bias_and_min_tokens(llm):
    p = ids(4, 8, 15, 16, 23, 42)
    forced = llm.generate(p, SamplingParams(temperature=1.0, seed=1, max_tokens=6, logit_bias={321: 100.0}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [321] * 6
    allowed = [10, 20, 30, 40]
    out = llm.generate(p, SamplingParams(temperature=1.5, seed=2, max_tokens=12, allowed_token_ids=allowed),
                       use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1
    # eos made almost certain: without min_tokens it ends at once, with min_tokens=5 after exactly 5 others
    eager = SamplingParams(temperature=0, max_tokens=10, logit_bias={EOS: 100.0})
    assert llm.generate(p, eager, use_tqdm=False)[0].outputs[0].token_ids == [EOS]
    late = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, logit_bias={EOS: 100.0}, min_tokens=5,
                                          stop_token_ids=[99]), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) == 6 and late.token_ids[-1] == EOS and EOS not in late.token_ids[:5]
    assert late.finish_reason == "stop" and 99 not in late.token_ids[:5]
    with pytest.raises(ValidationError) as e:  # nothing left to sample before min_tokens
        llm.generate(p, SamplingParams(min_tokens=2, allowed_token_ids=[EOS, 99], stop_token_ids=[99]),
                     use_tqdm=False)
    assert e.value.param == "allowed_token_ids"


def test_bad_words_ban_the_word(llm):
    tok = llm.get_tokenizer()
    prompt = "The state of the art"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    toks = base.outputs[0].token_ids
    word_tok = next(t for t in toks if tok.decode([t]).strip().isalpha()
                    and tok.encode(" " + tok.decode([t]).strip()) == [t])
    word = tok.decode([word_tok]).strip()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word]),
                       use_tqdm=False)[0].outputs[0]
    assert word_tok not in out.token_ids and out.token_ids != toks
    k = toks.index(word_tok)
    assert out.token_ids[:k] == toks[:k]  # identical up to the banned token


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_the_top_token_equals_greedy(llm, kw):
    p = [ids(5, 6, 7, 8), ids(9)]
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    got = llm.generate(p, SamplingParams(temperature=1.3, max_tokens=6, ignore_eos=True, **kw), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in greedy]


def test_seeded_sampling_is_reproducible_across_batch_compositions(llm):
    sp = SamplingParams(n=2, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
                        presence_penalty=0.3, seed=77, max_tokens=10, ignore_eos=True, logprobs=2)
    target = ids(*range(30, 52))
    alone = llm.generate(target, sp, use_tqdm=False)[0]
    eng = llm.llm_engine
    before = eng.scheduler.stats.num_preemptions
    crowd = llm.generate([ids(*range(1, 30)), target, ids(2, 3)] + [ids(*range(60, 80)), ids(*range(61, 79))],
                         [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), sp,
                          SamplingParams(temperature=0.5, seed=5, max_tokens=12)] +
                         [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)] * 2, use_tqdm=False)
    assert eng.scheduler.stats.num_preemptions > before  # the crowd ran under cache pressure
    assert [c.token_ids for c in crowd[1].outputs] == [c.token_ids for c in alone.outputs]
    assert crowd[1].outputs[0].token_ids != crowd[1].outputs[1].token_ids
    # sampled logprobs are the raw model distribution (fp32 log_softmax, 1e-5)
    for c in crowd[1].outputs:
        ref = full_logprobs(llm, target["prompt_token_ids"] + c.token_ids)[len(target["prompt_token_ids"]) - 1:-1]
        for t, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert abs(entry[tok].logprob - ref[t, tok].item()) < 1e-5
            assert entry[tok].rank == int((ref[t] > ref[t, tok]).sum()) + 1
            top = ref[t].topk(2)
            for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[tid].logprob - lp) < 1e-5
    assert_pools_empty(llm)


def check_prompt_logprobs(llm, prompt: list[int], plp, k: int) -> None:
    assert len(plp) == len(prompt) and plp[0] is None
    ref = full_logprobs(llm, prompt)
    for t in range(1, len(prompt)):
        entry, tok = plp[t], prompt[t]
        assert abs(entry[tok].logprob - ref[t - 1, tok].item()) < 1e-5
        assert entry[tok].rank == int((ref[t - 1] > ref[t - 1, tok]).sum()) + 1
        top = ref[t - 1].topk(k)
        assert set(top.indices.tolist()) <= set(entry) and len(entry) in (k, k + 1)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[tid].logprob - lp) < 1e-5
        assert entry[tok].decoded_token == llm.get_tokenizer().decode([tok])


def test_prompt_logprobs_across_chunks_decode_path_and_preemption(llm, monkeypatch):
    runner = llm.llm_engine.runner
    paths = []
    orig = runner._prompt_logprobs

    def spy(batch, logits_of):
        rows = orig(batch, logits_of)
        paths.extend((batch.is_decode, len(r)) for _, r in rows)
        return rows

    monkeypatch.setattr(runner, "_prompt_logprobs", spy)
    g = torch.Generator().manual_seed(3)
    sched = llm.llm_engine.scheduler
    # budget 4: 1-token chunks of the 9-token prompt ride along with 3 decodes on the decode path
    short = [torch.randint(0, 700, (n,), generator=g).tolist() for n in (1, 1, 1, 9)]
    sched.max_num_batched_tokens = 4
    try:
        outs = llm.generate([ids(*p) for p in short], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                      prompt_logprobs=2)] * 4, use_tqdm=False)
    finally:
        sched.max_num_batched_tokens = KW["max_num_batched_tokens"]
    assert any(d for d, _ in paths)
    # long prompts under cache pressure: chunked prefill and preemption (recomputed prompts are not re-reported)
    long = [torch.randint(0, 700, (n,), generator=g).tolist() for n in (23, 37, 30, 12)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=i % 3,
                             n=2 if i == 3 else 1) for i in range(4)]
    before = sched.stats.num_preemptions
    outs += llm.generate([ids(*p) for p in long], params, use_tqdm=False)
    assert sched.stats.num_preemptions > before
    assert any(not d and 1 < n < 37 for d, n in paths)  # a prompt split over chunks
    assert sum(n for _, n in paths) == sum(len(p) - 1 for p in short + long)  # each position computed once
    for p, k, o in zip(short + long, [2] * 4 + [sp.prompt_logprobs for sp in params], outs):
        check_prompt_logprobs(llm, p, o.prompt_logprobs, k)
    plain = llm.generate(ids(1, 2, 3), SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    assert_pools_empty(llm)
