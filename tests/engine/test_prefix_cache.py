"""Prefix caching on the tiny hybrid model (CPU, fp32): greedy tokens and logprobs are the same with the
cache on and off (1e-5) for shared system prompts, multi-turn chat, prefixes around a block boundary,
a request arriving while the holder of its prefix still prefills, evictions under tiny pools and
forced preemption; hits really skip work (tokens computed); prompt logprobs bypass the cache; the pools
hold nothing owned at the end; a full cache is evicted, not an error."""

from __future__ import annotations

import pytest
import torch
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams

BS = 8
BASE = dict(device="cpu", dtype="float32", max_model_len=160, max_num_seqs=4, max_num_batched_tokens=32,
            block_size=BS)
TOL = 1e-5


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **kw)


def tokens(n: int, seed: int, vocab: int = 1024) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ids(t: list[int]) -> dict:
    return {"prompt_token_ids": t}


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(cache on, cache off) engines with the same knobs."""
    on = LLM(str(tiny_checkpoint), **BASE)
    off = LLM(str(tiny_checkpoint), enable_prefix_caching=False, **BASE)
    assert on.llm_engine.prefix_cache is not None and off.llm_engine.prefix_cache is None
    yield on, off
    on.shutdown()
    off.shutdown()


def make_pair(tiny_checkpoint, **kw):
    knobs = {**BASE, **kw}
    return LLM(str(tiny_checkpoint), **knobs), LLM(str(tiny_checkpoint), **{**knobs, "enable_prefix_caching": False})


def assert_same(got, ref, what: str = "") -> None:
    """Same token ids, and logprobs (sampled and top-2) within TOL."""
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids, f"{what} request {i}: {ca.token_ids} != {cb.token_ids}"
            for pos, (da, db) in enumerate(zip(ca.logprobs, cb.logprobs)):
                assert da.keys() == db.keys(), f"{what} request {i} position {pos}: top tokens differ"
                for t in da:
                    d = abs(da[t].logprob - db[t].logprob)
                    assert d <= TOL, f"{what} request {i} position {pos} token {t}: logprob differs by {d:.2e}"


def assert_nothing_owned(llm: LLM) -> None:
    """Pools hold only unowned cached entries: no block, slot or snapshot is owned, pinned or pending."""
    assert_pools_empty(llm)
    pc = llm.llm_engine.prefix_cache
    if pc is not None:
        snap = pc.snapshot_pool
        assert snap.num_pending == 0 and snap.num_pinned == 0
        assert snap.num_used == snap.num_cached and snap.num_free + snap.num_used == snap.num_snapshots


def both(pair, run):
    """run(llm) on the cache-on and cache-off engines; returns (on outputs, off outputs)."""
    on, off = pair
    got, ref = run(on), run(off)
    assert_nothing_owned(on)
    assert_nothing_owned(off)
    return got, ref


def computed(llm: LLM) -> int:
    return llm.llm_engine.stats().num_scheduled_tokens


# ---------------------------------------------------------------- acceptance
def test_concurrent_requests_share_a_system_prompt(pair):
    on, off = pair
    on.reset_prefix_cache()
    system = tokens(21, seed=1)
    prompts = [system + tokens(3 + 2 * i, seed=100 + i) for i in range(6)]

    def run(llm):
        first = llm.generate(ids(prompts[0]), greedy(3), use_tqdm=False)
        return first + llm.generate([ids(p) for p in prompts[1:]], greedy(3), use_tqdm=False)

    before = on.llm_engine.stats()
    got, ref = both(pair, run)
    assert_same(got, ref, "shared system prompt")
    # the first sharer computes the system prompt again (no state there yet) and snapshots the branch point;
    # the later ones start from it: 21 shared tokens -> 2 full blocks
    cached = [o.num_cached_tokens for o in got]
    assert cached[0] == 0 and max(cached[2:]) == 16, cached
    after = on.llm_engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == sum(cached)


def test_three_turn_chat_reuses_the_previous_answer(pair):
    on, _ = pair
    on.reset_prefix_cache()
    answers = {}

    def run(llm):
        prompt, outs = tokens(13, seed=2), []
        for turn in range(3):
            out = llm.generate(ids(prompt), greedy(6), use_tqdm=False)[0]
            outs.append(out)
            prompt = prompt + out.outputs[0].token_ids + tokens(4, seed=20 + turn)
        answers[llm is on] = outs
        return outs

    got, ref = both(pair, run)
    assert_same(got, ref, "chat")
    # turn t + 1 starts at the last block boundary of turn t's computed tokens (prompt + answer but its last token)
    for prev, cur in zip(got, got[1:]):
        done = len(prev.prompt_token_ids) + len(prev.outputs[0].token_ids) - 1
        assert cur.num_cached_tokens == done // BS * BS > len(prev.prompt_token_ids)


@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_prefix_ending_around_a_block_boundary(pair, shift):
    on, _ = pair
    on.reset_prefix_cache()
    L = 2 * BS + shift
    prefix = tokens(L, seed=3)
    longer = prefix + tokens(5, seed=4)

    def run(llm):
        return [llm.generate(ids(p), greedy(2), use_tqdm=False)[0] for p in (prefix, longer, prefix)]

    got, ref = both(pair, run)
    assert_same(got, ref, f"boundary {shift:+d}")
    # the first request snapshots the last boundary before its prompt's end, and its prefill end when aligned
    expect = {-1: BS, 0: 2 * BS, 1: 2 * BS}[shift]
    assert got[1].num_cached_tokens == expect
    # the same prompt again: at least one token is always computed (the last prompt token)
    assert got[2].num_cached_tokens == (L - 1) // BS * BS


def test_request_arriving_while_its_prefix_is_still_prefilling(pair):
    shared = tokens(70, seed=5)
    a, b = shared + tokens(4, seed=6), shared + tokens(7, seed=7)
    cached = {}

    def run(llm):
        llm.reset_prefix_cache()
        eng = llm.llm_engine
        eng.add_request("a", ids(a), greedy(3))
        outs = {}
        # a prefills 2 chunks of the 32-token budget (2 steps; with async scheduling the second is in flight
        # after the first call, already counted on the host)
        while eng.scheduler.requests["a"].num_computed_tokens < 2 * 32:
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        assert eng.scheduler.requests["a"].num_computed_tokens < len(a)
        eng.add_request("b", ids(b), greedy(3))
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        cached[llm] = outs["b"].num_cached_tokens
        return [outs["a"], outs["b"]]

    got, ref = both(pair, run)
    assert_same(got, ref, "concurrent prefill")
    on, off = pair
    assert cached[on] >= 2 * 32 and cached[on] % BS == 0  # a's latest chunk end, snapshotted
    assert cached[off] == 0


def test_hit_skips_work(pair):
    on, off = pair
    on.reset_prefix_cache()
    prompt = tokens(34, seed=8)
    first = on.generate(ids(prompt), greedy(3), use_tqdm=False)[0]
    n0 = computed(on)
    again = on.generate(ids(prompt + tokens(3, seed=9)), greedy(3), use_tqdm=False)[0]
    hit = again.num_cached_tokens
    assert hit == 32 and first.num_cached_tokens == 0
    # only the uncached prompt tokens and the decodes ran through the model
    assert computed(on) - n0 == (37 - hit) + 2
    ref = off.generate(ids(prompt + tokens(3, seed=9)), greedy(3), use_tqdm=False)
    assert_same([again], ref)


def test_prompt_logprobs_skip_the_cache(pair):
    on, off = pair
    on.reset_prefix_cache()
    prompt = tokens(25, seed=10)
    on.generate(ids(prompt), greedy(2), use_tqdm=False)
    sp = greedy(2, prompt_logprobs=2)
    got = on.generate(ids(prompt + [5, 6]), sp, use_tqdm=False)
    ref = off.generate(ids(prompt + [5, 6]), sp, use_tqdm=False)
    assert got[0].num_cached_tokens == 0
    assert_same(got, ref)
    assert len(got[0].prompt_logprobs) == 27
    for da, db in zip(got[0].prompt_logprobs[1:], ref[0].prompt_logprobs[1:]):
        assert da.keys() == db.keys() and all(abs(da[t].logprob - db[t].logprob) <= TOL for t in da)
    # the same prompt without prompt logprobs hits
    assert on.generate(ids(prompt + [5, 6]), greedy(2), use_tqdm=False)[0].num_cached_tokens == 24


def test_evictions_under_tiny_pools(tiny_checkpoint):
    """Blocks for 10 x 8 tokens and 2 snapshots: the workload evicts both; results stay exact."""
    on, off = make_pair(tiny_checkpoint, num_gpu_blocks_override=10, num_state_snapshots_override=2,
                        max_model_len=64)
    groups = [tokens(18, seed=40 + g) for g in range(3)]
    prompts = [groups[i % 3] + tokens(2 + i % 4, seed=60 + i) for i in range(6)]

    def run(llm):
        out = []
        for k in range(0, 6, 2):
            out += llm.generate([ids(p) for p in prompts[k:k + 2]], greedy(3), use_tqdm=False)
        return out

    got, ref = both((on, off), run)
    assert_same(got, ref, "tiny pools")
    pc = on.llm_engine.prefix_cache
    assert pc.block_pool.num_evictions > 0 and pc.snapshot_pool.num_evictions > 0
    assert on.llm_engine.stats().prefix_cache_hits > 0


def test_preemption_with_prefix_caching(tiny_checkpoint):
    on, off = make_pair(tiny_checkpoint, num_gpu_blocks_override=12, max_num_seqs=5, max_num_batched_tokens=20,
                        max_model_len=64)
    system = tokens(19, seed=11)
    prompts = [system + tokens(1 + 2 * i, seed=70 + i) for i in range(8)]
    params = [greedy(3 + i % 5) for i in range(8)]

    def run(llm):
        return llm.generate([ids(p) for p in prompts], params, use_tqdm=False)

    got, ref = both((on, off), run)
    assert_same(got, ref, "preemption")
    assert on.llm_engine.stats().num_preemptions > 0
    assert sum(o.num_preemptions for o in got) > 0


def test_a_full_cache_is_evicted_not_an_error(tiny_checkpoint):
    on, off = make_pair(tiny_checkpoint, num_gpu_blocks_override=10, max_model_len=80)
    pool = on.llm_engine.scheduler.block_pool
    for i in range(4):  # distinct prompts: their blocks stay cached after they finish
        on.generate(ids(tokens(17, seed=80 + i)), greedy(2), use_tqdm=False)
    assert pool.num_cached_free >= 8 and pool.num_free == pool.num_blocks
    big = tokens(74, seed=90)  # 74 + 5 tokens need all 10 blocks
    got = on.generate(ids(big), greedy(5), use_tqdm=False)
    ref = off.generate(ids(big), greedy(5), use_tqdm=False)
    assert_same(got, ref, "full cache")
    assert got[0].outputs[0].finish_reason == "length" and pool.num_evictions >= 8
    assert_nothing_owned(on)


def test_abort_and_n_sequences_leave_nothing_owned(pair):
    on, off = pair
    on.reset_prefix_cache()
    prompt = tokens(29, seed=12)
    on.generate(ids(prompt), greedy(2), use_tqdm=False)
    eng = on.llm_engine
    eng.add_request("x", ids(prompt + [1, 2, 3]), greedy(20, n=2))
    eng.add_request("y", ids(prompt + [4]), greedy(20))
    for _ in range(3):
        eng.step()
    eng.abort_request(["x", "y"])
    while eng.has_unfinished_requests():
        eng.step()
    assert_nothing_owned(on)
    sp = greedy(3, n=2)
    got = on.generate(ids(prompt + [7]), sp, use_tqdm=False)
    assert got[0].num_cached_tokens == 24
    assert_same(got, off.generate(ids(prompt + [7]), sp, use_tqdm=False), "n=2")
    assert_nothing_owned(on)


def test_decode_snapshots_keep_async_overlap(pair):
    """With async scheduling (the default) a decode whose block ends with the token in flight snapshots the
    state without waiting for that token: every step after the first overlaps, the tokens are the cache-off
    engine's, and the next turn hits a snapshot taken during the answer."""
    on, _ = pair
    assert on.llm_engine.async_scheduling
    on.reset_prefix_cache()
    prompts = [tokens(5 + 3 * i, seed=40 + i) for i in range(3)]
    stats = {}

    def run(llm):
        before = llm.llm_engine.stats()
        outs = llm.generate([ids(p) for p in prompts], greedy(21), use_tqdm=False)  # crosses 2-3 boundaries
        after = llm.llm_engine.stats()
        stats[llm is on] = {k: getattr(after, k) - getattr(before, k) for k in ("num_steps", "num_overlapped_steps")}
        nxt = prompts[0] + outs[0].outputs[0].token_ids + tokens(3, seed=60)
        return outs + llm.generate(ids(nxt), greedy(2), use_tqdm=False)

    got, ref = both(pair, run)
    assert_same(got, ref, "decode snapshots")
    assert stats[True]["num_overlapped_steps"] == stats[True]["num_steps"] - 1, stats
    done = len(prompts[0]) + 21 - 1  # the first request's computed tokens: its answer's last token is not
    assert got[-1].num_cached_tokens == done // BS * BS > len(prompts[0])
