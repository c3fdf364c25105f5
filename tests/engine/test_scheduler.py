"""Scheduler without a model: budgets, decode-first order, chunked prefill, admission by both pools,
max_num_seqs, preemption (newest first, recompute), abort, requests that cannot fit, and a random
workload that must finish every request and leave both pools empty."""

from __future__ import annotations

import random

import pytest

from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.scheduler import Scheduler
from kimi_linear.engine.state_pool import StatePool
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, slots=8, max_num_seqs=8, budget=32, max_model_len=256):
    return Scheduler(BlockPool(num_blocks, block_size), StatePool(slots), max_num_seqs, budget, max_model_len)


def req(rid, prompt_len, max_tokens=4, **kw):
    return Request(str(rid), list(range(1, prompt_len + 1)),
                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw))


def step(s: Scheduler, token: int = 7):
    """One fake model step: every request whose step reaches its last token samples `token`."""
    out = s.schedule()
    sampled = {r.request_id: token for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update_from_output(out, sampled)
    return out


def check_invariants(s: Scheduler):
    owned = [b for r in s.running for b in r.block_ids]
    assert len(owned) == len(set(owned)) == s.block_pool.num_used
    assert sorted(r.state_slot for r in s.running) == sorted(
        i for i in range(s.state_pool.num_slots) if s.state_pool.is_used(i))
    for r in s.waiting:
        assert r.block_ids == [] and r.state_slot is None and r.num_computed_tokens == 0
    for r in s.running:
        assert len(r.block_ids) * s.block_pool.block_size >= r.num_computed_tokens
    assert len(s.running) <= s.max_num_seqs


def test_budget_chunks_prefill_and_decodes_go_first():
    s = make(budget=10)
    s.add_request(req("a", 4))
    s.add_request(req("b", 25))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4, "b": 6}  # b chunked to the budget
    assert sorted(out.reset_slots) == [0, 1]
    s.update_from_output(out, {"a": 9})
    out = s.schedule()
    # a decodes first, then b's next chunk fills the rest of the budget
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.total_num_tokens == 10 and not out.reset_slots
    assert s.stats.num_chunked_prefills == 2 and s.stats.num_mixed_steps == 1


def test_decode_first_even_when_prefill_is_older():
    s = make(budget=8)
    s.add_request(req("old", 20))
    s.add_request(req("new", 2))
    out = step(s)  # old gets 8 tokens, new nothing (budget spent)
    assert out.num_scheduled_tokens == {"old": 8}
    out = step(s)
    assert out.num_scheduled_tokens == {"old": 8}  # new is admitted only when budget remains
    out = step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["old", "new"]
    out = s.schedule()
    assert [r.request_id for r, _ in out.scheduled][:2] == ["old", "new"]
    assert all(n == 1 for _, n in out.scheduled)


def test_max_num_seqs_bounds_running():
    s = make(max_num_seqs=3)
    for i in range(6):
        s.add_request(req(i, 2))
    out = s.schedule()
    assert len(out.scheduled) == 3 and len(s.running) == 3 and len(s.waiting) == 3


def test_admission_needs_a_state_slot():
    s = make(slots=2, max_num_seqs=8)
    for i in range(4):
        s.add_request(req(i, 2))
    out = s.schedule()
    assert len(out.scheduled) == 2 and s.state_pool.num_free == 0


def test_admission_needs_blocks_for_the_chunk():
    s = make(num_blocks=4, block_size=4, budget=64)
    s.add_request(req("a", 12))  # 3 blocks
    s.add_request(req("b", 8))  # 2 blocks: does not fit beside a
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 12}
    assert [r.request_id for r in s.waiting] == ["b"]


def test_preemption_frees_the_newest_and_recomputes():
    # 6 blocks of 4 tokens; three requests of 7 prompt tokens take 2 blocks each, then must grow
    s = make(num_blocks=6, block_size=4, budget=64, max_model_len=64)
    for i in range(3):
        s.add_request(req(i, 7, max_tokens=6))
    step(s)
    assert s.block_pool.num_free == 0
    step(s)  # token 8 fits in block 2 of each
    out = step(s)  # token 9 needs a third block: the newest (2) is preempted
    assert out.preempted == ["2"]
    assert [r.request_id for r in s.running] == ["0", "1"]
    victim = s.waiting[0]
    assert victim.request_id == "2" and victim.num_computed_tokens == 0 and victim.block_ids == []
    assert victim.state_slot is None and victim.num_preemptions == 1
    assert victim.num_output_tokens == 2  # generated tokens kept
    assert out.num_scheduled_tokens == {"0": 1, "1": 1}
    check_invariants(s)
    while s.has_unfinished():
        out = step(s)
        check_invariants(s)
    assert s.stats.num_preemptions >= 1
    assert s.block_pool.num_free == 6 and s.state_pool.num_free == 8


def test_preempted_request_recomputes_prompt_and_outputs():
    s = make(num_blocks=6, block_size=4, budget=64, max_model_len=64)
    for i in range(3):
        s.add_request(req(i, 7, max_tokens=6))
    for _ in range(3):
        step(s)
    victim = s.waiting[0]
    # finish the others, then the victim is re-admitted with prompt + its 2 outputs to compute
    while victim.status == RequestStatus.WAITING:
        out = step(s)
    assert out.num_scheduled_tokens["2"] == 9 and out.reset_slots == [victim.state_slot]
    assert victim.num_output_tokens == 3  # the recompute step sampled the next token


def test_self_preemption_when_current_is_newest():
    s = make(num_blocks=4, block_size=4, budget=64, max_model_len=64)
    s.add_request(req("a", 8, max_tokens=8))  # 2 blocks
    s.add_request(req("b", 8, max_tokens=8))  # 2 blocks
    step(s)
    out = step(s)  # both need a third block at token 9; 'a' preempts 'b' (newest), 'a' grows
    assert out.preempted == ["b"] and out.num_scheduled_tokens == {"a": 1}
    check_invariants(s)


def test_abort_frees_everything():
    s = make(num_blocks=16, slots=4)
    for i in range(6):
        s.add_request(req(i, 5, max_tokens=10))
    step(s)
    step(s)
    running = [r.request_id for r in s.running]
    waiting = [r.request_id for r in s.waiting]
    assert running and waiting
    r0 = s.abort(running[0])
    w0 = s.abort(waiting[0])
    assert r0.status == w0.status == RequestStatus.FINISHED_ABORTED
    assert r0.finish_reason == "abort" and r0.block_ids == [] and r0.state_slot is None
    assert s.abort("missing") is None
    check_invariants(s)
    for rid in list(s.requests):
        s.abort(rid)
    assert not s.has_unfinished()
    assert s.block_pool.num_free == 16 and s.state_pool.num_free == 4


def test_prompt_that_can_never_fit_is_rejected():
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(ValidationError, match="needs 5 cache blocks but the cache has 4") as e:
        s.add_request(req("big", 16))
    assert e.value.param == "prompt"
    assert not s.has_unfinished() and s.block_pool.num_free == 4
    s.add_request(req("ok", 15))  # 15 + 1 tokens fit exactly
    with pytest.raises(ValidationError, match="already in use"):
        s.add_request(req("ok", 3))


def test_lone_request_at_cache_capacity_finishes_instead_of_looping():
    s = make(num_blocks=2, block_size=4, budget=64, max_model_len=1000)
    s.add_request(req("a", 6, max_tokens=100))
    for _ in range(10):
        out = step(s)
        if out.finished:
            break
    assert [r.request_id for r in out.finished] == ["a"]
    r = out.finished[0]
    # the whole cache is computed (8 tokens) and the token sampled from its end is the last one
    assert r.finish_reason == "length" and r.num_computed_tokens == 8 and r.num_tokens == 9
    assert not s.has_unfinished() and s.block_pool.num_free == 2


def test_stop_conditions():
    s = make()
    eos = frozenset({5})
    r1 = Request("eos", [1, 2], SamplingParams(temperature=0, max_tokens=10), eos)
    r2 = Request("ign", [1, 2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), eos)
    r3 = Request("stop_id", [1, 2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[5]), eos)
    r4 = Request("min", [1, 2], SamplingParams(temperature=0, max_tokens=10, min_tokens=2), eos)
    for r in (r1, r2, r3, r4):
        s.add_request(r)
    step(s, token=5)
    assert r1.finish_reason == "stop" and r1.stop_reason is None and r1.output_token_ids == [5]
    assert r3.finish_reason == "stop" and r3.stop_reason is None  # eos wins over the stop id
    assert not r2.is_finished and not r4.is_finished
    step(s, token=5)
    assert r4.finish_reason == "stop" and r4.num_output_tokens == 2
    step(s, token=5)
    assert r2.finish_reason == "length" and r2.output_token_ids == [5, 5, 5]
    s2 = make()
    r5 = Request("sid", [1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[9], ignore_eos=True), eos)
    s2.add_request(r5)
    step(s2, token=9)
    assert r5.finish_reason == "stop" and r5.stop_reason == 9
    s3 = make(max_model_len=4)
    r6 = Request("mml", [1, 2], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), eos)
    s3.add_request(r6)
    step(s3)
    step(s3)
    assert r6.finish_reason == "length" and r6.num_tokens == 4


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_workload_finishes_everything(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    # the engine guarantees a cache of at least max_model_len tokens; tight above that forces preemption
    s = make(num_blocks=48 // bs + rng.randint(0, 4), block_size=bs, slots=rng.randint(3, 6),
             max_num_seqs=rng.randint(3, 6), budget=rng.randint(4, 40), max_model_len=48)
    reqs = []
    for i in range(25):
        P = rng.randint(1, 30)
        r = req(i, P, max_tokens=rng.randint(1, 48 - P))
        reqs.append(r)
        s.add_request(r)
    aborted = set()
    for n_step in range(2000):
        if not s.has_unfinished():
            break
        out = step(s, token=rng.randint(10, 20))
        assert out.total_num_tokens <= s.max_num_batched_tokens
        assert not out.is_empty or out.preempted or out.finished
        check_invariants(s)
        if n_step % 17 == 5 and s.requests:
            rid = rng.choice(sorted(s.requests))
            s.abort(rid)
            aborted.add(rid)
    assert not s.has_unfinished(), "scheduler did not finish the workload"
    for r in reqs:
        if r.request_id in aborted:
            assert r.finish_reason == "abort"
        else:
            assert r.finish_reason == "length" and r.num_output_tokens == r.max_tokens
    assert s.block_pool.num_free == s.block_pool.num_blocks
    assert s.state_pool.num_free == s.state_pool.num_slots
    assert s.stats.num_preemptions > 0 and s.stats.num_chunked_prefills > 0


def test_admit_computed_takes_blocks_and_slot():
    s = make(num_blocks=8, block_size=4)
    r = req("ctx", 20, max_tokens=3)
    s.admit_computed(r, 19)
    assert r.status == RequestStatus.RUNNING and len(r.block_ids) == 5 and r.state_slot is not None
    out = s.schedule()
    assert out.num_scheduled_tokens == {"ctx": 1} and out.reset_slots == []  # states are the caller's
    with pytest.raises(ValueError):
        s.admit_computed(req("bad", 4), 4)
