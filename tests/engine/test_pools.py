"""BlockPool and StatePool: pure-Python ownership of MLA blocks and KDA slots, no model."""

from __future__ import annotations

import random

import pytest

from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.state_pool import StatePool


def test_block_pool_allocate_free_roundtrip():
    pool = BlockPool(8, block_size=4)
    assert pool.num_free == 8 and pool.token_capacity == 32
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0 and pool.num_used == 8
    assert not pool.can_allocate(1)
    with pytest.raises(RuntimeError, match="2 blocks requested, 0 free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 3 and all(pool.ref_count(x) == 0 for x in a)
    pool.free(b)
    assert pool.num_free == 8


def test_block_pool_rejects_double_free_and_foreign_ids():
    pool = BlockPool(4, block_size=2)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed but not in use"):
        pool.free(ids[:1])
    with pytest.raises(RuntimeError, match="freed but not in use"):
        pool.free([7])


def test_block_pool_ref_counts_keep_shared_blocks():
    pool = BlockPool(4, block_size=2)
    ids = pool.allocate(2)
    pool.share(ids)
    assert [pool.ref_count(i) for i in ids] == [2, 2]
    pool.free(ids)
    assert pool.num_free == 2  # still owned once
    pool.free(ids)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="is free"):
        pool.share(ids)


def test_blocks_needed_and_slot_mapping():
    pool = BlockPool(16, block_size=4)
    assert [pool.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    blocks = [7, 2, 11]
    assert pool.slot_mapping(blocks, 0, 10) == [28, 29, 30, 31, 8, 9, 10, 11, 44, 45]
    assert pool.slot_mapping(blocks, 5, 6) == [9]


def test_block_pool_random_ops_keep_invariants():
    rng = random.Random(0)
    pool = BlockPool(32, block_size=8)
    owned: list[list[int]] = []
    for _ in range(500):
        if owned and rng.random() < 0.45:
            pool.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(1, 6)
            if pool.can_allocate(n):
                owned.append(pool.allocate(n))
        flat = [b for o in owned for b in o]
        assert len(flat) == len(set(flat)) == pool.num_used
        assert pool.num_free + pool.num_used == 32
    for o in owned:
        pool.free(o)
    assert pool.num_free == 32


def test_state_pool():
    pool = StatePool(3)
    slots = [pool.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and slots[0] == 0  # lowest first
    assert not pool.can_allocate()
    with pytest.raises(RuntimeError, match="no free state slot"):
        pool.allocate()
    pool.free(1)
    assert pool.num_free == 1 and not pool.is_used(1)
    assert pool.allocate() == 1
    with pytest.raises(RuntimeError, match="freed but not in use"):
        pool.free(5)
    for s in (0, 1, 2):
        pool.free(s)
    with pytest.raises(RuntimeError, match="freed but not in use"):
        pool.free(2)
    assert pool.num_free == 3 and pool.num_used == 0


def test_pools_reject_empty_sizes():
    with pytest.raises(ValueError):
        BlockPool(0, 4)
    with pytest.raises(ValueError):
        StatePool(0)
