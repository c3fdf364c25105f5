"""BlockPool: ownership of the paged cache's blocks (pure Python over ints).

The tensors live in the model's `ModelCache`: each layer with a paged cache spec (MLA: the latents)
has a tensor [num_blocks, block_size, ...], and block id b is block b of all of them; this class only
decides which block ids are free. Invariants: every id in [0, num_blocks) is either in the free list with
ref count 0, or out of it with ref count >= 1; `num_free + num_used == num_blocks`. Ref counts allow
sharing a block between sequences later (prefix caching); today every block has one owner.

Token p of a sequence whose blocks are `block_ids` lives at flat slot
`block_ids[p // block_size] * block_size + p % block_size` (`slot_mapping`).
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def token_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (ref count 1 each). Raises RuntimeError when fewer are free:
        callers check `can_allocate` first."""
        if n > len(self._free):
            raise RuntimeError(f"BlockPool: {n} blocks requested, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def share(self, block_ids: list[int]) -> None:
        """Add one owner to each of `block_ids` (all must be in use)."""
        for b in block_ids:
            if self._ref[b] < 1:
                raise RuntimeError(f"BlockPool: block {b} is free, cannot share it")
            self._ref[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one owner of each block; blocks without owners go back to the free list."""
        for b in block_ids:
            if not 0 <= b < self.num_blocks or self._ref[b] < 1:
                raise RuntimeError(f"BlockPool: block {b} freed but not in use")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def slot_mapping(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of the sequence's tokens [start, end)."""
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]
