"""Reference MLA attention for one sequence, in both exact forms (spec section 5), plus paged-cache I/O,
and the flat-batch references of the kernels (`naive_mla_prefill`, `naive_mla_decode`: same signatures as
`prefill.mla_prefill` / `decode.mla_decode`, a host loop over the sequences).

Shapes: q [T, H, Dn + Dr] (nope part first); c_kv [L, R] the normalised latent of all L keys of the
sequence; k_pe [L, Dr] the shared, un-rotated key part; w_kv_b [H * (Dn + Dv), R], each head's rows
being [k_nope (Dn); v (Dv)]. The T queries are the sequence's last T positions: query t sits at
position L - T + t and attends to keys 0 .. L - T + t. Math in fp32; output [T, H, Dv] in q's dtype.

The paged latent cache is [num_blocks, block_size, R + Dr]; token p of a sequence lives in block
block_table[p // block_size] at offset p % block_size. `slot_mapping` holds flat slot indices.
"""

from __future__ import annotations

import torch


def _causal_softmax(scores: torch.Tensor, T: int, L: int) -> torch.Tensor:
    # scores [H, T, L]; query t may see keys l <= L - T + t
    pos_q = torch.arange(T, device=scores.device)[:, None] + (L - T)
    pos_k = torch.arange(L, device=scores.device)[None, :]
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    return torch.softmax(scores, dim=-1)


def mla_attention_mha(q, c_kv, k_pe, w_kv_b, v_head_dim: int, scale: float) -> torch.Tensor:
    """MHA form: expand the latent into per-head keys and values, then causal softmax attention."""
    T, H, Dqk = q.shape
    L, R = c_kv.shape
    Dr = k_pe.shape[-1]
    Dn = Dqk - Dr
    kv = (c_kv.float() @ w_kv_b.float().t()).view(L, H, Dn + v_head_dim)
    k = torch.cat([kv[..., :Dn], k_pe.float()[:, None, :].expand(L, H, Dr)], dim=-1)
    v = kv[..., Dn:]
    scores = torch.einsum("thd,lhd->htl", q.float(), k) * scale
    p = _causal_softmax(scores, T, L)
    return torch.einsum("htl,lhd->thd", p, v).to(q.dtype)


def mla_attention_absorbed(q, c_kv, k_pe, w_kv_b, v_head_dim: int, scale: float) -> torch.Tensor:
    """Absorbed (MQA) form: fold W_UK into the query and W_UV after the attention over the latent."""
    T, H, Dqk = q.shape
    L, R = c_kv.shape
    Dr = k_pe.shape[-1]
    Dn = Dqk - Dr
    w = w_kv_b.float().view(H, Dn + v_head_dim, R)
    w_uk, w_uv = w[:, :Dn], w[:, Dn:]
    qf = q.float()
    q_lat = torch.einsum("thn,hnr->thr", qf[..., :Dn], w_uk)
    scores = (torch.einsum("thr,lr->htl", q_lat, c_kv.float())
              + torch.einsum("thp,lp->htl", qf[..., Dn:], k_pe.float())) * scale
    p = _causal_softmax(scores, T, L)
    o_lat = torch.einsum("htl,lr->thr", p, c_kv.float())
    return torch.einsum("thr,hvr->thv", o_lat, w_uv).to(q.dtype)


def write_latent(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    """cache [NB, BS, D] <- latent [T, D] at flat slots `slot_mapping` [T] (negative = skip)."""
    flat = cache.view(-1, cache.shape[-1])
    keep = slot_mapping >= 0
    src = latent.to(cache.dtype)
    if cache.element_size() == 1:  # a float8 cache: the CPU's index_copy_ has no fp8 kernel; copy the bytes
        flat, src = flat.view(torch.uint8), src.view(torch.uint8)
    if bool(keep.all()):
        flat.index_copy_(0, slot_mapping.long(), src)
    else:
        flat.index_copy_(0, slot_mapping[keep].long(), src[keep])


def gather_latent(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached latents [length, D] of the sequence whose blocks are `block_table`."""
    BS = cache.shape[1]
    nb = (length + BS - 1) // BS
    return cache[block_table[:nb].long()].reshape(-1, cache.shape[-1])[:length]


def naive_mla_prefill(q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor | None,
                      block_tables: torch.Tensor | None, query_lens: list[int], context_lens: list[int],
                      w_kv_b: torch.Tensor, v_head_dim: int, scale: float) -> torch.Tensor:
    """MHA form per sequence of a mixed flat batch. Returns o [num_tokens, H, Dv] in q's dtype.

    q [num_tokens, H, Dn + Dr], latent [num_tokens, R + Dr] (the new tokens, back to back by sequence);
    cache [NB, BS, R + Dr] holding every new latent already (None: no context); query_lens / context_lens
    host lists [N]. A sequence with context attends over its cached latents, otherwise over `latent`."""
    R = w_kv_b.shape[1]
    out = torch.empty(q.shape[0], q.shape[1], v_head_dim, dtype=q.dtype, device=q.device)
    start = 0
    for n, (qlen, clen) in enumerate(zip(query_lens, context_lens)):
        if qlen == 0:
            continue
        if cache is not None and clen > 0:
            kv = gather_latent(cache, block_tables[n], clen + qlen)
        else:
            kv = latent[start:start + qlen]
        out[start:start + qlen] = mla_attention_mha(q[start:start + qlen], kv[:, :R], kv[:, R:], w_kv_b,
                                                    v_head_dim, scale)
        start += qlen
    return out


def naive_mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     w_kv_b: torch.Tensor, v_head_dim: int, scale: float, extras: dict | None = None) -> torch.Tensor:
    """Absorbed form per sequence, one query each. Returns o [N, H, Dv] in q's dtype (fp32 for an fp32 q,
    whatever the cache dtype: the oracle of the decode kernel).

    q [N, H, Dn + Dr]; cache [NB, BS, R + Dr] holding every attended token; seq_lens int [N] (0 = padding
    row -> zeros); `extras` is unused (the kernel's scratch). Reads seq_lens on the host."""
    R = w_kv_b.shape[1]
    out = torch.empty(q.shape[0], q.shape[1], v_head_dim, dtype=q.dtype, device=q.device)
    for n, L in enumerate(seq_lens.tolist()):
        if L == 0:  # padding row of a bucketed decode batch
            out[n] = 0
            continue
        kv = gather_latent(cache, block_tables[n], L)
        out[n:n + 1] = mla_attention_absorbed(q[n:n + 1], kv[:, :R], kv[:, R:], w_kv_b, v_head_dim, scale)
    return out
