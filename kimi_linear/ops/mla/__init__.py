"""Multi-head latent attention (NoPE): MHA form for prefill, absorbed MQA form over the paged latent cache.

Public entries (each runs the Triton kernel or the naive reference, `ops/dispatch.py`):
- `mla_prefill`: a mixed flat batch (`prefill.py` / `naive.naive_mla_prefill`). The kernel has no
  backward: when autograd needs an input, a cache-less pass on a kernel device (training on CUDA) runs
  `sdpa.mla_prefill_sdpa` (one causal SDPA per document), anything else the naive form;
- `mla_decode`: one query per sequence, CUDA-graph safe on the kernel path (`decode.py` /
  `naive.naive_mla_decode`);
- `write_latent_cache`: new latents into their paged-cache slots (`cache_write.py` / `naive.write_latent`).
The per-sequence references (`mla_attention_mha`, `mla_attention_absorbed`, `gather_latent`) are the
oracles of the tests. The kernels are imported on first use: importing the package never needs triton.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.dispatch import training_forms, use_triton
from kimi_linear.ops.mla.naive import (
    gather_latent,
    mla_attention_absorbed,
    mla_attention_mha,
    naive_mla_decode,
    naive_mla_prefill,
    write_latent,
)
from kimi_linear.ops.mla.sdpa import mla_prefill_sdpa

__all__ = ["mla_prefill", "mla_prefill_sdpa", "mla_decode", "write_latent_cache", "naive_mla_prefill", "naive_mla_decode",
           "mla_attention_mha", "mla_attention_absorbed", "gather_latent", "write_latent"]


def mla_prefill(q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor | None, block_tables: torch.Tensor | None,
                query_lens: list[int], context_lens: list[int], w_kv_b: torch.Tensor, v_head_dim: int,
                scale: float, **launch) -> torch.Tensor:
    """MLA attention of a mixed flat batch. Returns o [num_tokens, H, Dv] in q's dtype.

    q [num_tokens, H, Dn + Dr], latent [num_tokens, R + Dr] (the new tokens' latents, back to back by
    sequence); cache [NB, BS, R + Dr] with every new latent already written (None: no context);
    block_tables int32 [N, max_blocks]; query_lens / context_lens host lists [N]; w_kv_b [H * (Dn + Dv), R].
    `launch` (kernel path only): `key_chunk`.
    """
    if training_forms(q, latent, w_kv_b):
        if use_triton(q) and (cache is None or not any(context_lens)):
            return mla_prefill_sdpa(q, latent, query_lens, w_kv_b, v_head_dim, scale)
        return naive_mla_prefill(q, latent, cache, block_tables, query_lens, context_lens, w_kv_b, v_head_dim, scale)
    if use_triton(q):
        from kimi_linear.ops.mla.prefill import mla_prefill as kernel

        return kernel(q, latent, cache, block_tables, query_lens, context_lens, w_kv_b, v_head_dim, scale, **launch)
    return naive_mla_prefill(q, latent, cache, block_tables, query_lens, context_lens, w_kv_b, v_head_dim, scale)


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               w_kv_b: torch.Tensor, v_head_dim: int, scale: float, extras: dict | None = None,
               **launch) -> torch.Tensor:
    """Absorbed MLA decode, one query per sequence over its cached latents. Returns o [N, H, Dv] (q's dtype).

    q [N, H, Dn + Dr]; cache [NB, BS, R + Dr] holding every attended token, the current one included;
    block_tables int32 [N, max_blocks]; seq_lens int32 [N] (0 = padding row -> zeros); w_kv_b
    [H * (Dn + Dv), R]; extras: per-step scratch (the kernel's split buffers, reused while shapes match).
    The kernel path never syncs with the host; `launch` (kernel path only) overrides its launch settings.
    """
    if use_triton(q):
        from kimi_linear.ops.mla.decode import mla_decode as kernel

        return kernel(q, cache, block_tables, seq_lens, w_kv_b, v_head_dim, scale, extras, **launch)
    return naive_mla_decode(q, cache, block_tables, seq_lens, w_kv_b, v_head_dim, scale, extras)


def write_latent_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    """cache [NB, BS, D] <- latent [T, D] at flat slots `slot_mapping` [T] (negative = skip); sync-free on the
    kernel path."""
    if use_triton(latent):
        from kimi_linear.ops.mla.cache_write import write_latent_cache as kernel

        return kernel(cache, slot_mapping, latent)
    return write_latent(cache, slot_mapping, latent)
