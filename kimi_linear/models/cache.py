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
        if not isinstance(slots, torch.Tensor):
            slots = torch.tensor(slots, dtype=torch.long)
        if slots.numel() == 0:
            return
        slots = slots.to(self.device, torch.long)
        for t in self.slot_tensors():
            t.index_fill_(0, slots, 0)
