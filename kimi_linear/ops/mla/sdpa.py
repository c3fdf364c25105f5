"""Differentiable MLA prefill over packed documents (training): the MHA form, one causal SDPA per document.

Each document attends only to itself, from its first token (no cache): the latents are expanded
through kv_b_proj into per-head keys [k_nope ; k_pe] and values, then
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)` runs per document on 4-D
[1, H, n, D] views, so torch picks its fused attention kernels (memory-efficient / cuDNN on CUDA; flash
needs equal q and v head dims) and autograd their backward: only the output and the log-sum-exp are kept,
never the [H, n, n] attention matrix. (3-D inputs would send every call to the fp32 math fallback, which
materialises the scores in fp32 and saves them.) The per-document launches cost one host loop over the
documents (their lengths are host lists already); one document is one call, and documents of one length
(fixed-length batches packed into a row, as the synthetic tasks train) are one batched call [B, H, n, D]
(a loop over 256 short documents made full attention 4x slower per step than KDA there). A row of several documents on
CUDA runs on the memory-efficient backend only: cuDNN's attention builds an execution plan for every new
sequence length (tens of ms each), and packed rows bring new document lengths at every step, which made the
first hundred steps of a packed run several seconds each; one document per row (a fixed length) keeps torch's
choice (cuDNN on Hopper, the fastest at long lengths).
Same shapes and result as `naive.naive_mla_prefill` without a cache; output in q's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kimi_linear.errors import MLAError


def mla_prefill_sdpa(q: torch.Tensor, latent: torch.Tensor, query_lens: list[int], w_kv_b: torch.Tensor,
                     v_head_dim: int, scale: float) -> torch.Tensor:
    """q [T, H, Dn + Dr], latent [T, R + Dr] (documents back to back, `query_lens` host list),
    w_kv_b [H * (Dn + Dv), R] -> o [T, H, Dv] in q's dtype."""
    T, H, Dqk = q.shape
    R = w_kv_b.shape[1]
    Dr = latent.shape[1] - R
    Dn = Dqk - Dr
    if sum(query_lens) != T or latent.shape[0] != T or Dn < 0 or w_kv_b.shape[0] != H * (Dn + v_head_dim):
        raise MLAError(f"mla_prefill_sdpa: q {tuple(q.shape)}, latent {tuple(latent.shape)}, w_kv_b "
                       f"{tuple(w_kv_b.shape)} and query_lens (sum {sum(query_lens)}) do not fit together")
    kv = F.linear(latent[:, :R], w_kv_b).view(T, H, Dn + v_head_dim)
    dtype = kv.dtype  # the compute dtype (autocast's, or the parameters')
    k = torch.cat([kv[..., :Dn], latent[:, None, R:].to(dtype).expand(T, H, Dr)], dim=-1)
    v = kv[..., Dn:]
    qc = q.to(dtype)
    lens = [n for n in query_lens if n]
    several = len(lens) > 1
    backends = (sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) if several and q.is_cuda
                else contextlib.nullcontext())
    if several and all(n == lens[0] for n in lens):  # one length: one batched call
        n, B = lens[0], len(lens)
        with backends:
            o = F.scaled_dot_product_attention(*(t.reshape(B, n, H, -1).transpose(1, 2) for t in (qc, k, v)),
                                               is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(T, H, v_head_dim).to(q.dtype)
    outs = []
    start = 0
    with backends:
        for n in query_lens:
            if n == 0:
                continue
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(qc[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                               v[sl].transpose(0, 1)[None], is_causal=True, scale=scale)
            outs.append(o[0].transpose(0, 1))
            start += n
    if not outs:
        return q.new_zeros(0, H, v_head_dim)
    return (outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, 0)).to(q.dtype)
