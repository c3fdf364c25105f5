"""SequenceCache: an explicit per-sequence cache for direct model use (no engine).

Holds B sequences in a ModelCache (`storage`): state slot b for sequence b, and blocks of the paged
layers handed out in order as the sequences grow (the paged tensors double when they run out). Each
`model(input_ids [B, T], cache)` call appends T tokens to every sequence; prefill, chunked prefill and
decode can be mixed freely.

    cache = SequenceCache(model.config, batch_size=2, device="cpu", dtype=torch.float32)
    logits = model(prompt_ids, cache)          # prefill
    logits = model(next_ids[:, None], cache)   # one decode step
"""

from __future__ import annotations

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.models.cache import ModelCache
from kimi_linear.models.context import ForwardContext
from kimi_linear.models.kimi_linear import KimiLinearForCausalLM


class SequenceCache:
    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, block_size: int = 64, initial_blocks: int | None = None,
                 kv_cache_dtype: torch.dtype | None = None):
        self.config = config
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        num_blocks = initial_blocks or max(4, 4 * batch_size)
        specs = KimiLinearForCausalLM.cache_specs(config, dtype, kv_cache_dtype)  # kv: the MLA latent cache
        self.storage = ModelCache(specs, num_blocks, block_size, batch_size, self.device)
        self.lengths = [0] * batch_size
        self.block_tables: list[list[int]] = [[] for _ in range(batch_size)]
        self._next_block = 0
        self._pending: list[int] | None = None

    def _grow(self, needed_blocks: int) -> None:
        st = self.storage
        new = max(needed_blocks, 2 * st.num_blocks)
        for i in st.paged_layers():
            t = st.tensors[i]
            bigger = torch.zeros(new, *t.shape[1:], dtype=t.dtype, device=t.device)
            bigger[: t.shape[0]] = t
            st.tensors[i] = bigger
        st.num_blocks = new

    def begin_step(self, query_lens: list[int]) -> ForwardContext:
        """Make room for `query_lens[b]` new tokens per sequence and describe the step."""
        if len(query_lens) != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got {len(query_lens)}")
        bs = self.block_size
        slots = []
        for b, q in enumerate(query_lens):
            total = self.lengths[b] + q
            while len(self.block_tables[b]) * bs < total:
                self.block_tables[b].append(self._next_block)
                self._next_block += 1
            table = self.block_tables[b]
            slots.extend(table[p // bs] * bs + p % bs for p in range(self.lengths[b], total))
        if self._next_block > self.storage.num_blocks:
            self._grow(self._next_block)
        max_blocks = max(len(t) for t in self.block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in self.block_tables], dtype=torch.int32)
        seq_lens = [self.lengths[b] + q for b, q in enumerate(query_lens)]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        dev = self.device
        self._pending = query_lens
        return ForwardContext(
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
            query_lens=list(query_lens), context_lens=list(self.lengths),
            is_decode=all(q == 1 for q in query_lens),
            cache=self.storage,
            state_indices=torch.arange(self.batch_size, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_seq_len=max(seq_lens),
        )

    def end_step(self) -> None:
        for b, q in enumerate(self._pending or []):
            self.lengths[b] += q
        self._pending = None
