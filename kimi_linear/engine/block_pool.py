"""BlockPool: ownership of the paged cache's blocks, and the prefix cache's index of full blocks
(pure Python over ints).

The tensors live in the model's `ModelCache`: each layer with a paged cache spec (MLA: the latents)
has a tensor [num_blocks, block_size, ...], and block id b is block b of all of them; this class only
decides which block ids are free, who shares them, and which full blocks are cached by hash.

States of a block:
- owned: ref count >= 1 (sequences that read it; a cached block is shared by reference count);
- cached: ref count 0 but indexed by its block hash (`engine/block_hash.py`), kept until evicted: the
  evictable list is LRU, oldest first (`free` appends, so the caller frees a sequence's blocks last
  block first: a chain is evicted from its tail);
- free: ref count 0, no hash.
`num_free` counts free and cached blocks (both can be allocated: `allocate` takes free blocks first,
then evicts the least recently used cached ones), so `num_free + num_used == num_blocks`.

Only full, computed blocks get a hash (`cache_block`), and a block's owner writes only positions past
its computed tokens, so a cached or shared block is never written. Two sequences may compute the same
block; the first one indexed keeps the hash, the other stays a plain block.

Token p of a sequence whose blocks are `block_ids` lives at flat slot
`block_ids[p // block_size] * block_size + p % block_size` (`slot_mapping`).
"""

from __future__ import annotations

from collections import OrderedDict, deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached with no owner, LRU first
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out: free ones plus cached ones without an owner."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks indexed by hash (owned or not)."""
        return len(self._by_hash)

    @property
    def num_cached_free(self) -> int:
        """Cached blocks without an owner (evicted first when free blocks run out)."""
        return len(self._evictable)

    @property
    def token_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (ref count 1 each): free ones first, then evicted cached ones. Raises
        RuntimeError when fewer are free: callers check `can_allocate` first."""
        if n > self.num_free:
            raise RuntimeError(f"BlockPool: {n} blocks requested, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash[b]]
                self._hash[b] = None
                self.num_evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def share(self, block_ids: list[int]) -> None:
        """Add one owner to each of `block_ids`: blocks in use, or cached blocks without an owner (a
        prefix-cache hit takes them out of the evictable list)."""
        for b in block_ids:
            if self._ref[b] < 1:
                if b not in self._evictable:
                    raise RuntimeError(f"BlockPool: block {b} is free, cannot share it")
                del self._evictable[b]
            self._ref[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one owner of each block, in order; blocks without owners become free, or evictable
        (most recently used) when cached."""
        for b in block_ids:
            if not 0 <= b < self.num_blocks or self._ref[b] < 1:
                raise RuntimeError(f"BlockPool: block {b} freed but not in use")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    # ------------------------------------------------------------------ prefix cache index
    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Index the owned, full, computed block `block_id` under `block_hash`. Returns False (and
        indexes nothing) when another block already holds that hash or this block has one."""
        if self._ref[block_id] < 1:
            raise RuntimeError(f"BlockPool: block {block_id} is not in use, cannot cache it")
        if block_hash in self._by_hash or self._hash[block_id] is not None:
            return False
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        return True

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `block_hashes` that is fully cached."""
        out = []
        for h in block_hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def reset_cache(self) -> None:
        """Forget every block hash: cached blocks without an owner become free, owned ones plain."""
        for b in self._by_hash.values():
            self._hash[b] = None
        self._by_hash.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def slot_mapping(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of the sequence's tokens [start, end)."""
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]
