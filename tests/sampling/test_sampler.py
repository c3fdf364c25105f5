"""The batched Sampler against naive per-row torch, parameter by parameter; seeds; logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_linear.engine.sampler import (Sampler, SamplingBatch, apply_token_bitmask, compute_prompt_logprobs,
                                        make_generator)
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams

V = 40
EOS = [3, 5]


def naive_process(x: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    """One row, element by element in fp64, following vLLM's definitions."""
    x = x.double().clone()
    if p.allowed_token_ids is not None:
        for t in range(V):
            if t not in p.allowed_token_ids:
                x[t] = -math.inf
    for word in p.bad_words_token_ids or []:
        if len(word) == 1 or out[len(out) - len(word) + 1:] == word[:-1]:
            x[word[-1]] = -math.inf
    if len(out) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(EOS)):
            x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(out):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in out:
        x[t] -= p.frequency_penalty
    for t in set(out):
        x[t] -= p.presence_penalty
    return x


def naive_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = x / p.temperature
    probs = x.softmax(-1)
    keep = probs >= p.min_p * probs.max()
    order = sorted(range(V), key=lambda t: (-x[t].item(), t))
    if p.top_k > 0:
        for t in order[p.top_k:]:
            keep[t] = False
    kept = torch.where(keep, probs, 0)
    kept = kept / kept.sum()
    mass = 0.0
    for t in order:
        if not keep[t]:
            continue
        if mass >= p.top_p:
            keep[t] = False
        mass += kept[t].item()
    out = torch.where(keep, probs, 0)
    return out / out.sum()


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.2),
    "top_k_top_p_min_p": dict(top_k=7, top_p=0.8, min_p=0.05, temperature=1.3),
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=-0.7),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_one": dict(repetition_penalty=0.5),
    "logit_bias": dict(logit_bias={1: 5.0, 7: -100.0, 2: 0.5}),
    "allowed_token_ids": dict(allowed_token_ids=[0, 4, 9, 31]),
    "bad_words": dict(bad_words_token_ids=[[11], [12, 13], [20, 21, 22], [30, 31]]),
    "min_tokens": dict(min_tokens=10, stop_token_ids=[8]),
    "min_tokens_ignore_eos": dict(min_tokens=10, stop_token_ids=[8], ignore_eos=True),
    "min_tokens_reached": dict(min_tokens=2, stop_token_ids=[8]),
    "everything": dict(temperature=0.9, top_k=9, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.2,
                       repetition_penalty=1.3, logit_bias={0: 2.0}, min_tokens=6, bad_words_token_ids=[[12, 13]]),
}
PROMPT = [1, 2, 2, 9, 17, 30]
OUTPUT = [4, 4, 4, 9, 12, 20, 21, 33]


@pytest.mark.parametrize("name", list(CASES))
def test_processing_matches_naive(name):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 3
    plain = SamplingParams(temperature=0.8, max_tokens=None)
    params = [SamplingParams(max_tokens=None, **CASES[name]), plain, SamplingParams(max_tokens=None, **CASES[name])]
    prompts, outs = [PROMPT, [5], PROMPT[::-1]], [OUTPUT, [], OUTPUT[:5]]
    batch = SamplingBatch.build(params, [None] * 3, V, "cpu", prompt_token_ids=prompts, output_token_ids=outs,
                                eos_token_ids=EOS)
    got_logits = Sampler.process(logits.clone(), batch)
    got_probs = Sampler.probs(got_logits, batch)
    for i, p in enumerate(params):
        ref = naive_process(logits[i], p, prompts[i], outs[i])
        torch.testing.assert_close(got_logits[i].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_probs[i].double(), naive_probs(ref, p), rtol=1e-5, atol=1e-6)


def test_greedy_takes_argmax_of_processed_logits():
    logits = torch.randn(2, V)
    logits[0, 6] = 50.0
    params = [SamplingParams(temperature=0.0, logit_bias={6: -100.0}), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, SamplingBatch.build(params, [None, None], V, "cpu"))
    assert out.token_ids[0].item() == (logits[0] + torch.nn.functional.one_hot(torch.tensor(6), V) * -100).argmax()
    assert out.token_ids[1].item() == logits[1].argmax()


def test_exponential_race_draws_from_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0] + [-30.0] * (V - 6))
    p = SamplingParams(temperature=0.9, top_p=0.95)
    n = 20000
    batch = SamplingBatch.build([p] * n, [None] * n, V, "cpu")
    tokens = Sampler()(logits.expand(n, V), batch).token_ids
    freq = torch.bincount(tokens, minlength=V).double() / n
    want = naive_probs(logits.double(), p)
    assert (freq - want).abs().max() < 0.015


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    params = [SamplingParams(temperature=1.0, seed=s, top_k=20) for s in (11, 12, 13)]

    def run(order, extra):
        gens = {i: make_generator(params[i].seed, "cpu") for i in order}
        rows, ps, gs = [], [], []
        for i in order:
            rows.append(logits[i])
            ps.append(params[i])
            gs.append(gens[i])
        for j in range(extra):  # unseeded neighbours
            rows.append(logits[3 + j % 3])
            ps.append(SamplingParams(temperature=1.0))
            gs.append(None)
        toks = []
        for _ in range(8):  # several steps: generators advance per step
            out = Sampler()(torch.stack(rows), SamplingBatch.build(ps, gs, V, "cpu"))
            toks.append(out.token_ids[:len(order)].tolist())
        return {i: [t[k] for t in toks] for k, i in enumerate(order)}

    a = run([0, 1, 2], 0)
    b = run([2, 0, 1], 5)
    c = run([1], 2)
    assert a == {i: b[i] for i in a}
    assert a[1] == c[1]
    assert len({tuple(v) for v in a.values()}) == 3  # different seeds differ


def test_logprobs_are_raw_log_softmax():
    logits = (torch.randn(4, V) * 4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.5, logprobs=5, top_k=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logit_bias={0: 100.0})]
    batch = SamplingBatch.build(params, [None] * 4, V, "cpu", prompt_token_ids=[[1]] * 4, output_token_ids=[[]] * 4)
    out = Sampler()(logits, batch)
    ref = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-5)
    assert out.top_ids.shape == (4, 5)
    torch.testing.assert_close(out.top_logprobs, ref.topk(5, -1).values, rtol=0, atol=1e-5)
    assert out.token_ids[3].item() == 0
    want_rank = (ref > ref.gather(1, out.token_ids[:, None])).sum(-1) + 1
    assert torch.equal(out.ranks, want_rank)



def test_no_logprobs_requested_skips_the_log_softmax(monkeypatch):
    """Without a row asking for logprobs the raw log_softmax (a [B, V] pass per step) is not computed: the
    tokens are the same as with logprobs, the logprobs and ranks None."""
    logits = torch.randn(3, V) * 3

    def run(**lp):
        params = [SamplingParams(temperature=0.0, **lp), SamplingParams(temperature=0.8, seed=1, **lp),
                  SamplingParams(top_k=3, seed=2, **lp)]
        gens = [None, make_generator(1, "cpu"), make_generator(2, "cpu")]
        return Sampler()(logits, SamplingBatch.build(params, gens, V, "cpu"))

    ref = run(logprobs=0)
    calls = []
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = run()
    assert calls == [] and out.logprobs is None and out.ranks is None and out.top_ids is None
    assert torch.equal(out.token_ids, ref.token_ids) and ref.logprobs is not None

def test_prompt_logprobs_helper():
    logits = torch.randn(9, V) * 2
    targets = torch.randint(0, V, (9,))
    got = compute_prompt_logprobs(logits, targets, 3, rows_per_chunk=4)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got.logprobs, ref[torch.arange(9), targets], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.top_logprobs, ref.topk(3, -1).values, rtol=0, atol=1e-5)
    assert torch.equal(got.ranks, (ref > ref[torch.arange(9), targets][:, None]).sum(-1) + 1)
    assert compute_prompt_logprobs(logits, targets, 0).top_ids is None


def test_bitmask_application():
    import xgrammar as xgr

    logits = torch.randn(3, 70)
    bitmask = torch.randint(-(2 ** 31), 2 ** 31 - 1, (3, 3), dtype=torch.int32)
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, bitmask)
    got = apply_token_bitmask(logits, bitmask)
    assert torch.equal(got, ref)


def test_bad_words_from_tokenizer(tiny_tok):
    p = SamplingParams(bad_words=["hello", " the"])
    p.update_from_tokenizer(tiny_tok)
    words = p.bad_words_token_ids
    assert words == [tiny_tok.encode("hello"), tiny_tok.encode(" hello"), tiny_tok.encode("the"),
                     tiny_tok.encode(" the")]
    assert all(tiny_tok.decode(w).strip() in ("hello", "the") for w in words)


def test_invalid_ids_and_missing_inputs():
    with pytest.raises(ValidationError, match="out of the vocabulary"):
        SamplingBatch.build([SamplingParams(logit_bias={V: 1.0})], [None], V, "cpu")
    with pytest.raises(ValueError, match="pass its token ids"):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)], [None], V, "cpu")
