"""StatePool: ownership of the state slots (pure Python over ints).

The tensors live in the model's `ModelCache`: each layer with a slot cache spec (KDA: recurrent state
and conv window) has tensors [num_slots, ...]; each running request owns exactly one slot for all
those layers, read and written in place by the kernels. Invariants: every slot id in [0, num_slots) is
either free or owned; `num_free + num_used == num_slots`. A slot handed out here must be zeroed
(`ModelCache.reset_slots`) before the request's first forward: the scheduler reports the slots it
hands out in `SchedulerOutput.reset_slots` and the runner zeroes them.

A model without slot layers still has slots (of zero bytes): the slot is also the request's row in the
runner's persistent block table.
"""

from __future__ import annotations


class StatePool:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"StatePool needs num_slots >= 1, got {num_slots}")
        self.num_slots = num_slots
        # lowest ids first, so that slot use stays compact
        self._free = list(range(num_slots - 1, -1, -1))
        self._used = [False] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        """Take a free slot. Raises RuntimeError when none is free: callers check `can_allocate`."""
        if not self._free:
            raise RuntimeError("StatePool: no free state slot")
        slot = self._free.pop()
        self._used[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise RuntimeError(f"StatePool: slot {slot} freed but not in use")
        self._used[slot] = False
        self._free.append(slot)

    def is_used(self, slot: int) -> bool:
        return self._used[slot]
