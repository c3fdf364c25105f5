"""BlockTable: the running requests' block ids as one persistent device tensor, row = state slot.

`table` [num_slots, max_blocks_per_seq] int32 never moves (CUDA graphs capture its address). Row s
belongs to whoever owns state slot s; a batch gathers its rows with `state_indices`, on the device
(inside the captured decode graph too), so a decode step never copies a 1M-token block table from
the host. Rows are updated incrementally: blocks are append-only while a request owns its slot, so
only new block ids are copied. A new owner (new request, or the same one after preemption, marked
by `Request.slot_epoch`) rewrites the row from the start. Entries past a sequence's blocks are stale
and never read: attention reads only `seq_lens[n]` tokens.
"""

from __future__ import annotations

import torch

from kimi_linear.engine.request import Request
from kimi_linear.models.cache import to_device


class BlockTable:
    def __init__(self, num_slots: int, max_blocks_per_seq: int, device: torch.device):
        self.max_blocks_per_seq = max_blocks_per_seq
        self.table = torch.zeros(num_slots, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._owner: list[tuple[str, int] | None] = [None] * num_slots
        self._synced = [0] * num_slots  # block ids already written in the row

    def sync(self, requests: list[Request]) -> None:
        """Write the block ids of `requests` that the table does not have yet."""
        for req in requests:
            s = req.state_slot
            key = (req.request_id, req.slot_epoch)
            if self._owner[s] != key:
                self._owner[s] = key
                self._synced[s] = 0
            k, ids = self._synced[s], req.block_ids
            if len(ids) > k:
                if len(ids) > self.max_blocks_per_seq:
                    raise RuntimeError(f"{req.request_id}: {len(ids)} blocks exceed the block table width "
                                       f"{self.max_blocks_per_seq}")
                self.table[s, k:len(ids)] = to_device(ids[k:], torch.int32, self.table.device)
                self._synced[s] = len(ids)

    def rows(self, state_indices: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Block tables [N, num_blocks] of the sequences in slots `state_indices` [N] (negative = padding,
        gets row 0: its seq_len is 0 so nothing is read)."""
        t = self.table if num_blocks is None else self.table[:, :num_blocks]
        return t.index_select(0, state_indices.clamp(min=0).to(torch.long))
