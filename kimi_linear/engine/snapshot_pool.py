"""SnapshotPool: ownership of the prefix cache's state snapshots (pure Python over ints).

A snapshot is a copy of one state slot (every slot-spec layer's tensors: KDA's recurrent state and
conv window) taken right after a block-aligned position of a sequence; it is keyed by the block
hash of the block that ends there (`engine/block_hash.py`). The tensors live in `models.SlotSnapshots`;
this class decides which snapshot ids hold what. A snapshot id is
- free;
- pending: handed out for a copy that this step makes (`allocate`), not yet readable; `commit`
  indexes it under its key after the step, `cancel` frees it;
- cached: indexed by key; evictable in LRU order (oldest first) unless pinned;
- pinned: a restore into a slot is scheduled this step (`pin` / `unpin`), so it cannot be evicted.
`allocate` evicts the least recently used cached snapshot when none is free, and returns None when
every snapshot is pending or pinned. Invariant: `num_free + num_used == num_snapshots`.
"""

from __future__ import annotations

from collections import OrderedDict


class SnapshotPool:
    def __init__(self, num_snapshots: int):
        if num_snapshots < 0:
            raise ValueError(f"SnapshotPool needs num_snapshots >= 0, got {num_snapshots}")
        self.num_snapshots = num_snapshots
        self._free = list(range(num_snapshots - 1, -1, -1))  # lowest ids first
        self._key: list[bytes | None] = [None] * num_snapshots
        self._by_key: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached and unpinned, oldest first
        self._pins = [0] * num_snapshots
        self._pending: set[int] = set()
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_snapshots - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_pinned(self) -> int:
        return sum(1 for p in self._pins if p)

    def allocate(self) -> int | None:
        """A snapshot id for a copy made this step (pending), evicting the LRU cached one if needed;
        None when every snapshot is pending or pinned."""
        if self._free:
            i = self._free.pop()
        elif self._lru:
            i, _ = self._lru.popitem(last=False)
            del self._by_key[self._key[i]]
            self._key[i] = None
            self.num_evictions += 1
        else:
            return None
        self._pending.add(i)
        return i

    def commit(self, i: int, key: bytes) -> bool:
        """The copy into pending snapshot `i` is done: index it under `key` (most recently used). When
        `key` is cached already, `i` is freed instead and False returned."""
        if i not in self._pending:
            raise RuntimeError(f"SnapshotPool: snapshot {i} is not pending")
        self._pending.discard(i)
        if key in self._by_key:
            self._free.append(i)
            return False
        self._key[i] = key
        self._by_key[key] = i
        self._lru[i] = None
        return True

    def cancel(self, i: int) -> None:
        if i not in self._pending:
            raise RuntimeError(f"SnapshotPool: snapshot {i} is not pending")
        self._pending.discard(i)
        self._free.append(i)

    def lookup(self, key: bytes) -> int | None:
        return self._by_key.get(key)

    def pin(self, i: int) -> None:
        """Keep cached snapshot `i` from eviction until `unpin` (a restore reads it this step)."""
        if self._key[i] is None:
            raise RuntimeError(f"SnapshotPool: snapshot {i} is not cached, cannot pin it")
        self._pins[i] += 1
        self._lru.pop(i, None)

    def unpin(self, i: int) -> None:
        if self._pins[i] < 1:
            raise RuntimeError(f"SnapshotPool: snapshot {i} is not pinned")
        self._pins[i] -= 1
        if self._pins[i] == 0:
            self._lru[i] = None  # used just now: most recently used

    def discard(self, key: bytes) -> bool:
        """Free the cached snapshot under `key` (superseded) unless it is pinned. Returns whether it was freed."""
        i = self._by_key.get(key)
        if i is None or self._pins[i]:
            return False
        del self._by_key[key]
        self._key[i] = None
        self._lru.pop(i, None)
        self._free.append(i)
        return True

    def reset(self) -> None:
        """Free every cached snapshot that is not pinned."""
        for i in list(self._lru):
            self.discard(self._key[i])
