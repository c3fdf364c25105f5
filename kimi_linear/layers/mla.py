"""Multi-head latent attention layer with NoPE (spec section 5), over a flat batch.

Per token the layer caches [kv_a_layernorm(c) (R) ; k_pe (Dr)] into the paged latent cache. Prefill
rows use the MHA form (latents expanded through kv_b_proj); decode rows (pure decode batches, and the
decode rows of a mixed batch, `ForwardContext.row_runs`) use the absorbed MQA form over the latent cache,
so a decode row never expands its whole context. Both are exact rewrites of the same attention.
For inference q_proj and kv_a_proj_with_mqa run as one GEMM over their tied rows (`layers/fused.py`),
and the latent norm + k_pe copy is one kernel (`RMSNorm.with_tail`).
The op entries (`ops.mla.mla_decode`, `ops.mla.mla_prefill`) pick the kernels on CUDA (split-KV decode
over the paged cache, CUDA-graph safe; chunked flash MHA prefill) and the naive per-sequence ops on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kimi_linear.config import ModelConfig
from kimi_linear.layers.cache_spec import PagedCacheSpec, TensorSpec
from kimi_linear.layers.fused import fused_weight, needs_grad
from kimi_linear.layers.linear import linear
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops import mla as mla_ops

if TYPE_CHECKING:
    from kimi_linear.models.context import ForwardContext


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.layer_idx = layer_idx
        self.num_heads = H
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scale = self.qk_head_dim ** -0.5
        self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_cache_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.mla_kv_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)

    @staticmethod
    def cache_spec(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None) -> PagedCacheSpec:
        """Per token, in the paged cache: the normalised latent (R) then the shared key part (Dr), in `dtype`,
        or in `kv_cache_dtype` (float8_e4m3fn: 1 byte per value, a static scale of 1.0: the latent is RMS-
        normalised and k_pe of unit size, well inside e4m3's range; writes saturate at +-448)."""
        return PagedCacheSpec(TensorSpec("latent", (config.kv_cache_dim,), kv_cache_dtype or dtype))

    def fused_groups(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups tied for inference (`layers/fused.py`): the two projections of x."""
        return {"in": [self.q_proj.weight, self.kv_a_proj_with_mqa.weight]}

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        N = x.shape[0]
        H = self.num_heads
        w = fused_weight(self, "in", self.fused_groups()["in"])
        if w is not None and not needs_grad(x):
            out = linear(x, w)  # [N, H * (Dn + Dr) + R + Dr], one GEMM; q and ckv are views
            q, ckv = out[:, :H * self.qk_head_dim], out[:, H * self.qk_head_dim:]
        else:
            q, ckv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q = q.view(N, H, self.qk_head_dim)
        cache = ctx.cache.tensors[self.layer_idx] if ctx.cache is not None else None
        scatter = (cache, ctx.slot_mapping) if cache is not None else None
        latent = self.kv_a_layernorm.with_tail(ckv, self.qk_rope_head_dim, scatter)  # [N, R + Dr], cached

        if cache is None:
            o = self._prefill(q, latent, cache, ctx)
        elif ctx.is_decode:
            o = self._decode(q, cache, ctx)
        else:  # a mixed batch: decode rows absorbed over the cache, prefill rows in the MHA form
            runs = ctx.row_runs()
            parts = [self._decode(q[t0:t1], cache, sub) if sub.is_decode else
                     self._prefill(q[t0:t1], latent[t0:t1], cache, sub) for t0, t1, sub in runs]
            o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj(o.reshape(N, H * self.v_head_dim))

    def _prefill(self, q, latent, cache, ctx: ForwardContext) -> torch.Tensor:
        return mla_ops.mla_prefill(q, latent, cache, ctx.block_tables, ctx.query_lens, ctx.context_lens,
                                   self.kv_b_proj.weight, self.v_head_dim, self.scale)

    def _decode(self, q, cache, ctx: ForwardContext) -> torch.Tensor:
        return mla_ops.mla_decode(q, cache, ctx.block_tables, ctx.seq_lens, self.kv_b_proj.weight,
                                  self.v_head_dim, self.scale, ctx.extras)
