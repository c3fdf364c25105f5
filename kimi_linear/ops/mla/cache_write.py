"""Sync-free write of new latents into the paged MLA cache (the CUDA path of `write_latent`).

One program per token: it loads the token's flat slot and stores the row there, or nothing when the
slot is negative (padding rows of a bucketed decode batch). No host sync, so the decode step can be
captured in a CUDA graph; every slot of a step is distinct, so the stores never race.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MLAError


@triton.jit
def _write_latent_kernel(cache_ptr, slot_ptr, latent_ptr, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = (offs < D) & (slot >= 0)
    x = tl.load(latent_ptr + t * stride_t + offs, mask=mask)
    tl.store(cache_ptr + slot * D + offs, x.to(tl.float32).to(cache_ptr.dtype.element_ty), mask=mask)  # fp8 via fp32


def write_latent_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    """cache [NB, BS, D] <- latent [T, D] at flat slots `slot_mapping` [T] (negative = skip)."""
    T, D = latent.shape
    if cache.shape[-1] != D or slot_mapping.shape[0] != T:
        raise MLAError(f"write_latent_cache: latent {tuple(latent.shape)}, slots {tuple(slot_mapping.shape)} "
                         f"and cache {tuple(cache.shape)} do not match")
    if T == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    _write_latent_kernel[(T,)](cache, slot_mapping, latent, latent.stride(0), D=D,
                               BLOCK_D=triton.next_power_of_2(D), num_warps=4)
