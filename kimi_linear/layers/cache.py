"""Cache storage of the hybrid model: paged MLA latent blocks and KDA state slots (tensors only).

Who owns which ids is decided elsewhere (the engine's block and state pools, or `SequenceCache` for
direct model use); this class only holds the tensors and knows their layouts:

- MLA layer l: `mla[l]` [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] in the model dtype,
  per token the normalised latent followed by the shared key part (576 values for the real shape).
- KDA layer l: `kda_recurrent[l]` [num_slots, H, K, V] fp32 (o = S^T q) and `kda_conv[l]`
  [num_slots, W - 1, 3 * H * K] in the model dtype: the last W - 1 pre-conv q|k|v inputs, oldest first.

A slot must be zeroed (`reset_slots`) before a new sequence starts in it.
"""

from __future__ import annotations

import torch

from kimi_linear.config import ModelConfig


class HybridCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, num_slots: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.dtype = dtype
        L = config.num_hidden_layers
        self.mla: list[torch.Tensor | None] = [None] * L
        self.kda_recurrent: list[torch.Tensor | None] = [None] * L
        self.kda_conv: list[torch.Tensor | None] = [None] * L
        H, K = config.kda_num_heads, config.kda_head_dim
        for i, kind in enumerate(config.layer_types):
            if kind == "mla":
                self.mla[i] = torch.zeros(num_blocks, block_size, config.kv_cache_dim, dtype=dtype, device=device)
            else:
                self.kda_recurrent[i] = torch.zeros(num_slots, H, K, K, dtype=torch.float32, device=device)
                self.kda_conv[i] = torch.zeros(num_slots, config.conv_kernel_size - 1, 3 * H * K,
                                               dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block across all MLA layers."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return len(config.mla_layers) * block_size * config.kv_cache_dim * itemsize

    @staticmethod
    def bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of one KDA state slot across all KDA layers (fp32 recurrent state + conv window)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        H, K = config.kda_num_heads, config.kda_head_dim
        per_layer = H * K * K * 4 + (config.conv_kernel_size - 1) * 3 * H * K * itemsize
        return len(config.kda_layers) * per_layer

    def reset_slots(self, slots: torch.Tensor | list[int]) -> None:
        """Zero the KDA states of `slots` so that new sequences start from an empty state."""
        if not isinstance(slots, torch.Tensor):
            slots = torch.tensor(slots, dtype=torch.long)
        if slots.numel() == 0:
            return
        slots = slots.to(self.device, torch.long)
        for t in self.kda_recurrent + self.kda_conv:
            if t is not None:
                t.index_fill_(0, slots, 0)

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy the KDA states of slot `src` into slot `dst` (prefix-cache snapshots, forks)."""
        for t in self.kda_recurrent + self.kda_conv:
            if t is not None:
                t[dst].copy_(t[src])
