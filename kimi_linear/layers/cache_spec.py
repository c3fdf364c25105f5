"""Cache specs: what one layer keeps between forward passes, declared by the layer (`cache_spec`).

Two kinds, each a frozen dataclass that the model collects per layer and its cache allocates from:

- `PagedCacheSpec`: per-token storage in blocks of `block_size` tokens shared by all sequences, one
  tensor [num_blocks, block_size, *token.shape] per layer (MLA's latent cache). A sequence's tokens are
  found through its block table; `bytes_per_token` is one token of one layer.
- `SlotCacheSpec`: a fixed-size state per sequence, independent of its length, one tensor
  [num_slots, *state.shape] per entry of `states` (KDA's recurrent state and conv window). A slot is
  zeroed before a new sequence uses it; `bytes_per_slot` is one slot of one layer.

Both answer `paged`, `bytes_per_token` and `bytes_per_slot` (0 for the other kind), so whoever sizes
memory adds them up without knowing the layer kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a cache entry, without its leading (block or slot) dimensions."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PagedCacheSpec:
    """Paged per-token cache of one layer: a tensor [num_blocks, block_size, *token.shape]."""
    token: TensorSpec
    paged: ClassVar[bool] = True

    @property
    def bytes_per_token(self) -> int:
        return self.token.nbytes

    @property
    def bytes_per_slot(self) -> int:
        return 0


@dataclass(frozen=True)
class SlotCacheSpec:
    """Per-sequence state of one layer: one tensor [num_slots, *s.shape] for each s in `states`, in order."""
    states: tuple[TensorSpec, ...]
    paged: ClassVar[bool] = False

    @property
    def bytes_per_token(self) -> int:
        return 0

    @property
    def bytes_per_slot(self) -> int:
        return sum(s.nbytes for s in self.states)
