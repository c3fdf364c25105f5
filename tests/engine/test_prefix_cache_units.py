"""Prefix-cache parts without a model run: the block pool's hash index and LRU eviction, the snapshot
pool, the hash chain, the scheduler with a prefix cache over a random workload (no shared block is ever
written, nothing leaks), snapshot save / restore on a ModelCache, sizing, config and CLI flags."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from kimi_linear.engine.block_hash import BlockHasher, block_hash_fn
from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.prefix_cache import PrefixCache
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.scheduler import Scheduler
from kimi_linear.engine.snapshot_pool import SnapshotPool
from kimi_linear.engine.state_pool import StatePool
from kimi_linear.errors import ConfigError
from kimi_linear.sampling_params import SamplingParams


def h(i: int) -> bytes:
    return i.to_bytes(4, "little")


# ---------------------------------------------------------------- block pool
def test_block_pool_caches_freed_blocks_until_evicted_lru():
    pool = BlockPool(4, block_size=2)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert pool.cache_block(a[0], h(0)) and pool.cache_block(a[1], h(1))
    assert not pool.cache_block(b[0], h(0))  # the hash is taken: b[0] stays a plain block
    assert pool.lookup([h(0), h(1), h(2)]) == a and pool.lookup([h(1)]) == [a[1]]
    pool.free(a[::-1])  # tail first
    assert pool.num_free == 2 and pool.num_cached_free == 2 and pool.num_used == 2
    pool.share([a[0]])  # a hit revives a cached block without owner
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 1
    pool.free([a[0]])
    pool.free(b)  # plain blocks are handed out first
    assert pool.allocate(2) == b and pool.num_evictions == 0
    # then the least recently used cached block: a[1] (freed before a[0] came back)
    assert pool.allocate(1) == [a[1]] and pool.num_evictions == 1
    assert pool.cached_block(h(1)) is None and pool.lookup([h(0), h(1)]) == [a[0]]
    with pytest.raises(RuntimeError, match="not in use, cannot cache"):
        pool.cache_block(a[0], h(5))
    pool.reset_cache()
    assert pool.num_cached == 0 and pool.lookup([h(0)]) == [] and pool.num_free == 1
    with pytest.raises(RuntimeError, match="is free"):
        pool.share([a[0]])


# ---------------------------------------------------------------- snapshot pool
def test_snapshot_pool_pending_pinned_and_lru():
    pool = SnapshotPool(2)
    s0, s1 = pool.allocate(), pool.allocate()
    assert pool.allocate() is None and pool.num_pending == 2  # nothing cached to evict
    assert pool.lookup(h(0)) is None  # pending snapshots are not readable
    assert pool.commit(s0, h(0)) and pool.commit(s1, h(1))
    assert pool.lookup(h(0)) == s0 and pool.num_cached == 2
    pool.pin(s0)
    s2 = pool.allocate()  # evicts the unpinned one
    assert s2 == s1 and pool.lookup(h(1)) is None and pool.num_evictions == 1
    assert pool.allocate() is None  # s0 pinned, s2 pending
    assert not pool.commit(s2, h(0)) and pool.num_free == 1  # key already cached: freed instead
    assert not pool.discard(h(0))  # pinned
    pool.unpin(s0)
    assert pool.discard(h(0)) and pool.num_free == 2 and pool.num_used == 0
    s = pool.allocate()
    pool.cancel(s)
    assert pool.num_free == 2
    with pytest.raises(RuntimeError, match="not pinned"):
        pool.unpin(s0)
    assert SnapshotPool(0).allocate() is None


# ---------------------------------------------------------------- hash chain
def _req(tokens, rid="r", **kw):
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, **kw))


@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
def test_hash_chain(algo):
    hasher = BlockHasher(4, algo)
    a = hasher.hashes(_req(list(range(10))))
    b = hasher.hashes(_req(list(range(8)) + [99, 98, 97]))
    c = hasher.hashes(_req([0, 1, 2, 9] + list(range(4, 12))))
    assert len(a) == 2 and a == b[:2]  # same first 8 tokens
    assert c[0] != a[0] and c[1] != a[1]  # a difference in block 0 changes every later hash (chain)
    salted = _req(list(range(8)))
    salted.cache_extra_keys = ("adapter-1",)
    assert hasher.hashes(salted)[0] != a[0]
    r = _req(list(range(6)))
    assert len(hasher.hashes(r)) == 1
    r.append_token(6)
    r.append_token(7)
    assert hasher.hashes(r) == a  # grows with the output tokens
    with pytest.raises(ConfigError, match="must be one of") as e:
        block_hash_fn("md5")
    assert e.value.key == "prefix_caching_hash_algo"


# ---------------------------------------------------------------- scheduler with a prefix cache
def _scheduler(num_blocks=24, bs=4, slots=4, snapshots=3, budget=12, needs_state=True):
    pool = BlockPool(num_blocks, bs)
    pc = PrefixCache(pool, SnapshotPool(snapshots), needs_state=needs_state)
    return Scheduler(pool, StatePool(slots), slots, budget, 64, pc), pc


def _step(s: Scheduler, rng: random.Random):
    """One fake model step; checks that no shared or cached block is written and chunk ends are aligned."""
    out = s.schedule()
    bs = s.block_pool.block_size
    for req, n in out.scheduled:
        c = req.num_computed_tokens
        for p in range(c, c + n):
            b = req.block_ids[p // bs]
            assert s.block_pool.ref_count(b) == 1 and s.block_pool.block_hash(b) is None, \
                f"{req.request_id} writes position {p} into shared or cached block {b}"
        end = c + n
        if end < req.num_tokens and n >= bs and not out.preempted:
            assert end % bs == 0, f"{req.request_id}: chunk [{c}, {end}) not aligned"
    restored = {slot for _, slot in out.snapshots.restores}
    assert not restored & set(out.reset_slots)
    sampled = {r.request_id: rng.randrange(50) for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update_from_output(out, sampled)
    return out


def _check_owned(s: Scheduler):
    owners: dict[int, int] = {}
    for r in s.running:
        for b in r.block_ids:
            owners[b] = owners.get(b, 0) + 1
    for b in range(s.block_pool.num_blocks):
        assert s.block_pool.ref_count(b) == owners.get(b, 0)
    snap = s.prefix_cache.snapshot_pool
    assert snap.num_pending == 0 and snap.num_pinned == 0 and snap.num_used == snap.num_cached


@pytest.mark.parametrize("needs_state", [True, False])
def test_random_workload_shares_blocks_and_leaks_nothing(needs_state):
    rng = random.Random(1)
    s, pc = _scheduler(num_blocks=10, needs_state=needs_state)
    bases = [[rng.randrange(50) for _ in range(rng.randint(5, 14))] for _ in range(3)]
    next_id = 0
    for _ in range(300):
        if rng.random() < 0.3 and len(s.requests) < 8:
            base = rng.choice(bases)
            s.add_request(Request(str(next_id), base + [rng.randrange(50) for _ in range(rng.randint(0, 6))],
                                  SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True)))
            next_id += 1
        if s.running and rng.random() < 0.05:
            s.abort(rng.choice(s.running).request_id)
        if s.has_unfinished():
            _step(s, rng)
        _check_owned(s)
    while s.has_unfinished():
        _step(s, rng)
    _check_owned(s)
    assert s.block_pool.num_free == s.block_pool.num_blocks and s.state_pool.num_free == s.state_pool.num_slots
    assert pc.stats.hits > 0 and s.stats.num_preemptions > 0
    if needs_state:
        assert pc.stats.restores > 0 and pc.stats.saves > 0
    else:
        assert pc.stats.saves == 0 and pc.snapshot_pool.num_used == 0


def test_hit_admission_and_targets():
    s, pc = _scheduler(bs=4, budget=64, snapshots=6)
    rng = random.Random(0)
    base = list(range(1, 19))  # 18 tokens: prompt boundary 16
    s.add_request(Request("a", base, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 16}  # split at the prompt's last boundary for its snapshot
    assert [x.keep for x in out.snapshots.saves] == [True]
    s.update_from_output(out, {})
    while s.has_unfinished():
        _step(s, rng)
    b = Request("b", base[:10] + [40, 41, 42], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    s.add_request(b)
    out = s.schedule()
    # blocks match 2 blocks (8 tokens), no snapshot there yet: b computes from 0 and stops at the branch point
    assert out.num_scheduled_tokens == {"b": 8} and b.num_cached_tokens == 0 and out.reset_slots
    s.update_from_output(out, {})
    while s.has_unfinished():
        _step(s, rng)
    c = Request("c", base[:9] + [7, 7, 7, 7, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    s.add_request(c)
    out = s.schedule()
    assert c.num_cached_tokens == 8 and out.snapshots.restores == [(out.snapshots.restores[0][0], c.state_slot)]
    assert out.num_scheduled_tokens == {"c": 4} and not out.reset_slots  # 8 -> its prompt boundary 12
    s.update_from_output(out, {})
    while s.has_unfinished():
        _step(s, rng)
    # the same prompt as a finished request: at least its last token is computed
    d = Request("d", list(base), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    s.add_request(d)
    out = s.schedule()
    assert d.num_cached_tokens == 16 and out.num_scheduled_tokens["d"] == 2


def test_prompt_logprobs_request_does_not_hit():
    s, pc = _scheduler(bs=4, budget=64)
    rng = random.Random(0)
    s.add_request(Request("a", list(range(1, 19)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
    while s.has_unfinished():
        _step(s, rng)
    r = Request("p", list(range(1, 19)) + [3], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    s.add_request(r)
    out = s.schedule()
    assert r.num_cached_tokens == 0 and out.num_scheduled_tokens["p"] == 16
    r.num_prompt_logprobs = 17  # as if preempted after its prompt logprobs were computed: may hit now
    assert pc.lookup(r).num_tokens == 16


# ---------------------------------------------------------------- snapshots on a ModelCache
def test_slot_snapshots_save_and_restore(tiny_checkpoint):
    from kimi_linear.config import ModelConfig
    from kimi_linear.models import KimiLinearForCausalLM, ModelCache
    from kimi_linear.models.cache import SlotSnapshots

    specs = KimiLinearForCausalLM.cache_specs(ModelConfig.from_pretrained(tiny_checkpoint), torch.float32)
    cache = ModelCache(specs, num_blocks=4, block_size=8, num_slots=3, device="cpu")
    snaps = SlotSnapshots(cache, 2)
    assert snaps.nbytes == 2 * SlotSnapshots.bytes_per_snapshot(specs) > 0
    for t in cache.slot_tensors():
        t.normal_()
    before = [t.clone() for t in cache.slot_tensors()]
    snaps.save([2, 0], [0, 1])
    cache.reset_slots([0, 1, 2])
    snaps.restore([1, 0], [1, 2])
    for t, b in zip(cache.slot_tensors(), before):
        assert torch.equal(t[1], b[0]) and torch.equal(t[2], b[2]) and not t[0].any()
    paged = [t.clone() for t in cache.paged_tensors()]
    snaps.save([1], [0])
    assert all(torch.equal(a, b) for a, b in zip(paged, cache.paged_tensors()))  # slot state only


# ---------------------------------------------------------------- sizing, config, flags
def test_snapshot_pool_share_of_cuda_sizing(tiny_checkpoint, monkeypatch, caplog):
    from kimi_linear.config import ModelConfig
    from kimi_linear.engine import memory
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.models import KimiLinearForCausalLM, ModelCache

    GiB = 1 << 30
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device=None: (77 * GiB, 80 * GiB))
    monkeypatch.setattr(memory, "profile_peak_activation", lambda *a, **k: 3 * GiB)
    specs = KimiLinearForCausalLM.cache_specs(ModelConfig.from_pretrained(tiny_checkpoint), torch.bfloat16)
    cfg = EngineConfig(model=str(tiny_checkpoint), gpu_memory_utilization=0.5, max_num_seqs=8, block_size=16,
                       prefix_cache_state_fraction=0.25)
    s = memory.cuda_sizing(None, specs, "cuda", cfg, 1024, 79 * GiB, 64, 1024)
    available = 40 * GiB - 2 * GiB - 3 * GiB
    bpsnap = ModelCache.bytes_per_slot(specs)
    assert s.bytes_per_snapshot == bpsnap and s.num_snapshots == int(available * 0.25 // bpsnap)
    bps = bpsnap + 64
    assert s.num_blocks == (available - s.num_snapshots * bpsnap - 8 * bps) // ModelCache.bytes_per_block(specs, 16)
    with caplog.at_level(logging.INFO, logger="kimi_linear.engine.memory"):
        s.log(1024)
    assert any(f"{s.num_snapshots} KDA state snapshots fit" in r.getMessage() for r in caplog.records)
    off = memory.cuda_sizing(None, specs, "cuda", cfg.replace(enable_prefix_caching=False), 1024, 79 * GiB, 64, 1024)
    assert off.num_snapshots == 0
    fixed = memory.cuda_sizing(None, specs, "cuda", cfg.replace(num_gpu_blocks_override=7, num_state_slots_override=3,
                                                                num_state_snapshots_override=5), 1024, 0, 64, 16)
    assert fixed.num_snapshots == 5


@pytest.mark.parametrize("kw,key", [
    (dict(prefix_cache_state_fraction=1.0), "prefix_cache_state_fraction"),
    (dict(prefix_cache_state_fraction=-0.1), "prefix_cache_state_fraction"),
    (dict(prefix_caching_hash_algo="md5"), "prefix_caching_hash_algo"),
    (dict(num_state_snapshots_override=-1), "num_state_snapshots_override"),
    (dict(enable_prefix_caching="on"), "enable_prefix_caching"),
])
def test_config_rejects_bad_prefix_cache_values(tmp_path, kw, key):
    from kimi_linear.engine.config import EngineConfig

    with pytest.raises(ConfigError) as e:
        EngineConfig(model=str(tmp_path), **kw)
    assert e.value.key == key


def test_cli_flags(tmp_path):
    import argparse

    from kimi_linear.cli.engine_args import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    d = p.parse_args([str(tmp_path)])
    assert d.enable_prefix_caching is True and d.prefix_caching_hash_algo == "sha256"
    a = p.parse_args([str(tmp_path), "--no-enable-prefix-caching", "--prefix-caching-hash-algo", "xxhash",
                      "--prefix-cache-state-fraction", "0.2", "--num-state-snapshots-override", "0"])
    assert (a.enable_prefix_caching, a.prefix_caching_hash_algo, a.prefix_cache_state_fraction,
            a.num_state_snapshots_override) == (False, "xxhash", 0.2, 0)
    with pytest.raises(SystemExit):
        p.parse_args([str(tmp_path), "--prefix-caching-hash-algo", "md5"])


def test_admit_computed_requests_are_never_cached():
    s, pc = _scheduler(bs=4, budget=64)
    r = Request("bench", list(range(1, 30)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    s.admit_computed(r, 28)
    rng = random.Random(0)
    while s.has_unfinished():
        _step(s, rng)
    assert s.block_pool.num_cached == 0 and pc.snapshot_pool.num_used == 0
    assert r.status == RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize("ends", ["runs on", "stops", "aborted"])
def test_snapshot_of_a_block_ending_with_the_token_in_flight(ends):
    """Async scheduling plans the next decode before the token it consumes is read back: a snapshot of the
    block that ends with that token is planned without a key (nothing hashes the placeholder) and keyed at
    commit, after the token is known; if the token finished the request (or it was aborted), the copy is
    cancelled, as the synchronous engine never runs that step."""
    s, pc = _scheduler(bs=4, budget=64, snapshots=4)
    a = Request("a", [11, 12, 13], SamplingParams(temperature=0, max_tokens=8), eos_token_ids=frozenset({7}))
    s.add_request(a)
    first = s.schedule()  # the 3-token prompt: no block boundary
    s.advance(first, {"a"})  # its token is in flight: a placeholder
    assert a.num_placeholders == 1 and a.num_tokens == 4
    nxt = s.schedule()  # the decode that consumes it ends on the boundary at 4
    (save,) = nxt.snapshots.saves
    assert save.key is None and save.num_blocks == 1 and pc.snapshot_pool.num_pending == 1
    assert a.block_hashes == []  # nothing hashed the placeholder
    if ends == "aborted":
        s.abort("a")
        a.fill_placeholder(None)
    else:
        s.resolve_token(a, 7 if ends == "stops" else 5)
    s.advance(nxt, {"a"})
    assert pc.snapshot_pool.num_pending == 0
    want = BlockHasher(4).hashes(Request("b", [11, 12, 13, 5], SamplingParams()), 1)[0]
    if ends == "runs on":
        assert pc.snapshot_pool.lookup(want) == save.snapshot and a.progress_snapshot == want
        assert pc.stats.saves == 1
    else:
        assert pc.snapshot_pool.num_used == 0 and pc.stats.saves == 0
