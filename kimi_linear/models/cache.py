"""ModelCache: the tensors every layer keeps between forward passes, allocated from the layers' cache specs.

`specs[l]` is layer l's spec (`layers/cache_spec.py`, from `KimiLinearForCausalLM.cache_specs`), and
`tensors[l]` its storage, which the layer reads by its own index:

- a paged spec: one tensor [num_blocks, block_size, *token.shape] (MLA: the latent cache
  [num_blocks, block_size, R + Dr] in the model dtype);
- a slot spec: a tuple with one tensor [num_slots, *state.shape] per state, in the spec's order (KDA:
  the fp32 recurrent state [num_slots, H, K, V] and the conv window [num_slots, W - 1, 3 * H * K]);
- None: the layer keeps nothing.

Who owns which block and slot ids is decided elsewhere (the engine's block and state pools, or
`SequenceCache` for direct model use); this class only holds the tensors. Everything starts zeroed,
and a slot must be zeroed again (`reset_slots`) before a new sequence starts in it.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (a list, or a tensor anywhere) as a `dtype` tensor on `device`, without waiting for the
    device: on CUDA a host list or host tensor goes through fresh pinned memory and an asynchronous copy (a
    blocking or pageable copy would wait for the step in flight under async scheduling; the caching host
    allocator keeps the pinned tensor until the copy has run). A host tensor always comes back as its own
    copy, so later host writes to it (a reused buffer) never reach the result. The one owner of that rule:
    the engine's sampler, runner and block table use it too."""
    cuda = torch.device(device).type == "cuda"
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            return values.to(device, dtype)
        if not cuda:
            return values.to(device, dtype, copy=True)
        staged = torch.empty(values.shape, dtype=dtype, pin_memory=True)
        staged.copy_(values)
        return staged.to(device, non_blocking=True)
    return torch.tensor(list(values), dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def _indices(ids, device: torch.device) -> torch.Tensor:
    """Slot / snapshot ids as an int64 tensor on `device` (`to_device`)."""
    return to_device(ids, torch.long, device)


class ModelCache:
    def __init__(self, specs: list, num_blocks: int, block_size: int, num_slots: int,
                 device: torch.device | str):
        self.specs = list(specs)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.tensors: list[torch.Tensor | tuple[torch.Tensor, ...] | None] = []
        for spec in self.specs:
            if spec is None:
                self.tensors.append(None)
            elif spec.paged:
                t = spec.token
                self.tensors.append(torch.zeros(num_blocks, block_size, *t.shape, dtype=t.dtype, device=device))
            else:
                self.tensors.append(tuple(torch.zeros(num_slots, *s.shape, dtype=s.dtype, device=device)
                                          for s in spec.states))

    # ------------------------------------------------------------------ sizes (from the specs alone)
    @staticmethod
    def bytes_per_block(specs: list, block_size: int) -> int:
        """Bytes of one block across all layers with a paged cache."""
        return block_size * sum(s.bytes_per_token for s in specs if s is not None)

    @staticmethod
    def bytes_per_slot(specs: list) -> int:
        """Bytes of one state slot across all layers with a per-sequence state."""
        return sum(s.bytes_per_slot for s in specs if s is not None)

    # ------------------------------------------------------------------ views
    def paged_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.specs) if s is not None and s.paged]

    def paged_tensors(self) -> list[torch.Tensor]:
        """Every paged tensor [num_blocks, block_size, ...], in layer order."""
        return [self.tensors[i] for i in self.paged_layers()]

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every slot tensor [num_slots, ...], in layer order (each slot layer's states in spec order)."""
        return [t for s, ts in zip(self.specs, self.tensors) if s is not None and not s.paged for t in ts]

    # ------------------------------------------------------------------ slots
    def reset_slots(self, slots: torch.Tensor | list[int]) -> None:
        """Zero the states of `slots` so that new sequences start from an empty state."""
        slots = _indices(slots, self.device)
        if slots.numel() == 0:
            return
        for t in self.slot_tensors():
            t.index_fill_(0, slots, 0)


class SlotSnapshots:
    """Copies of state slots at points in time (the prefix cache's state snapshots), for every slot tensor
    of a `ModelCache`, whatever the layer kind: `tensors[i]` is [num_snapshots, *shape] beside the
    cache's `slot_tensors()[i]` [num_slots, *shape] (same dtype and device). `save` copies slots into
    snapshots, `restore` snapshots into slots; both are plain device copies (index_select / index_copy_)
    that the engine runs outside a captured CUDA graph, ordered on the stream with the forward passes.
    Which snapshot holds what is decided elsewhere (the engine's snapshot pool)."""

    def __init__(self, cache: ModelCache, num_snapshots: int):
        self.cache = cache
        self.num_snapshots = num_snapshots
        self.tensors = [torch.zeros(num_snapshots, *t.shape[1:], dtype=t.dtype, device=t.device)
                        for t in cache.slot_tensors()] if num_snapshots > 0 else []

    @staticmethod
    def bytes_per_snapshot(specs: list) -> int:
        """Bytes of one snapshot: one state slot of every slot layer."""
        return ModelCache.bytes_per_slot(specs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def _index(self, ids) -> torch.Tensor:
        return _indices(ids, self.cache.device)

    def save(self, slots, snapshot_ids) -> None:
        """snapshot_ids[i] <- slots[i] for every slot tensor."""
        if len(slots) == 0 or not self.tensors:
            return
        src, dst = self._index(slots), self._index(snapshot_ids)
        for live, snap in zip(self.cache.slot_tensors(), self.tensors):
            snap.index_copy_(0, dst, live.index_select(0, src))

    def restore(self, snapshot_ids, slots) -> None:
        """slots[i] <- snapshot_ids[i] for every slot tensor."""
        if len(slots) == 0 or not self.tensors:
            return
        src, dst = self._index(snapshot_ids), self._index(slots)
        for live, snap in zip(self.cache.slot_tensors(), self.tensors):
            live.index_copy_(0, dst, snap.index_select(0, src))
