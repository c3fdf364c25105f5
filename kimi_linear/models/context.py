"""The batch metadata of one forward pass, built by whoever drives the model (runner or SequenceCache).

The model always sees a flat batch: the new tokens of N sequences back to back (`cu_seqlens`).
Sequence n has `context_lens[n]` tokens already in the cache and `query_lens[n]` new ones.

- `cache` (a `ModelCache`, or None for a cache-less pass) holds each layer's tensors; a layer reads its
  own, `cache.tensors[layer_idx]`.
- Layers with a slot cache (KDA) read and write the state slot `state_indices[n]` (a negative index =
  padding, skip).
- Layers with a paged cache (MLA) write each new token's entry to `slot_mapping[t]` and attend over the
  sequence's `seq_lens[n]` = context + query tokens, found through `block_tables[n]`.

`is_decode` means every sequence has exactly one new token and a cache: the decode kernels apply
(fused recurrent KDA, absorbed MLA) and the step can be captured in a CUDA graph, so that path reads
device tensors only (never the host lists). `extras` is scratch that a decode kernel may keep across
steps under its own key (`ops/mla/decode.py`: "mla_decode_ws"); the CUDA-graph runner hands each batch
size its own dict (`engine/cuda_graph.py`).

Layers never import this module at run time (it belongs to the model): they use the attributes above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kimi_linear.models.cache import ModelCache


@dataclass
class ForwardContext:
    cu_seqlens: torch.Tensor  # int32 [N + 1], on the model's device
    query_lens: list[int]  # host copy of the per-sequence new-token counts
    context_lens: list[int]  # host: tokens cached before this step, per sequence
    is_decode: bool = False
    cache: ModelCache | None = None
    state_indices: torch.Tensor | None = None  # int32 [N]
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]
    block_tables: torch.Tensor | None = None  # int32 [N, max_blocks]
    seq_lens: torch.Tensor | None = None  # int32 [N], context + query
    max_seq_len: int = 0
    extras: dict = field(default_factory=dict)  # decode kernels' scratch, kept across steps (split-KV buffers)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @staticmethod
    def for_prefill(query_lens: list[int], device: torch.device | str) -> "ForwardContext":
        """A cache-less context: each sequence is processed from scratch and nothing is stored."""
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        return ForwardContext(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                              query_lens=list(query_lens), context_lens=[0] * len(query_lens),
                              max_seq_len=max(query_lens, default=0))
