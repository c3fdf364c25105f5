"""MLA prefill for mixed batches on the GPU: MHA form, flash attention over key chunks (Triton).

A batch holds N sequences; sequence n has `context_lens[n]` tokens already cached and `query_lens[n]`
new ones (their latents already written to the paged cache when there is one). Its queries sit at
positions context .. context + query - 1 and attend bottom-right causally over context + query keys.

Design and invariants:
- Decode-like rows (one new token over a non-empty cache) go through the absorbed split-KV decode
  kernel in one batched call; every other sequence runs the MHA form (fewer FLOPs per key than the
  absorbed form: 192 + 128 vs 576 + 512 per head).
- Keys are processed in chunks of at most `key_chunk` tokens (a multiple of the block size): the chunk's
  latents are gathered from the paged cache (or taken from the new tokens when nothing is cached),
  expanded through kv_b_proj in the model dtype ([chunk, H, Dn + Dv], k_pe stays shared, never
  broadcast), and the kernel merges the chunk into the running output with log-sum-exp. Memory is
  bounded by the chunk whatever the context (a 1M context would need 20 GB expanded at once).
- The kernel: one program per (query tile, head); online softmax in fp32 (exp2); the causal mask is
  key position <= query position, with the key range of a tile cut at its last query. The first chunk
  holds key 0, which every query sees, so the running log-sum-exp is finite before any merge.
- Not CUDA-graph material (host loops over the batch); decode batches take `ops/mla/decode.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MLAError
from kimi_linear.ops.mla.decode import mla_decode

_LOG2E = 1.4426950408889634
KEY_CHUNK_BYTES = 512 << 20  # budget of one expanded key/value chunk
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the bf16 / fp16 kernel for more than 32 queries (H100 choice;
# benchmarks/mla_prefill.py sweeps others: 128-query tiles with 8 warps also compile to warpgroup MMAs without
# spills on sm_90, and share each key tile between twice the queries)
TILES = (64, 64, 4, 3)


@triton.jit
def _mla_prefill_kernel(
    q, kv, kpe, o, lse,
    scale_log2, T, KC, q_pos0, k_pos0,
    s_q_t, s_q_h, s_kv_t, s_kv_h, s_kp_t, s_o_t, s_o_h, s_l_t,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr, IS_FIRST: tl.constexpr, PREC: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_h = tl.program_id(1)
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = rows < T
    o_dn = tl.arange(0, BLOCK_DN)
    o_dr = tl.arange(0, BLOCK_DR)
    o_dv = tl.arange(0, BLOCK_DV)
    m_dn = o_dn < DN
    m_dr = o_dr < DR
    m_dv = o_dv < DV

    q_row = q + rows.to(tl.int64)[:, None] * s_q_t + i_h * s_q_h
    qn = tl.load(q_row + o_dn[None, :], mask=m_row[:, None] & m_dn[None, :], other=0.0)
    qp = tl.load(q_row + DN + o_dr[None, :], mask=m_row[:, None] & m_dr[None, :], other=0.0)
    q_pos = q_pos0 + rows

    # keys of this chunk visible to the tile's last query: k_pos0 + j <= q_pos0 + last row
    last = tl.minimum(i_m * BLOCK_M + BLOCK_M, T) - 1
    j_end = tl.minimum(KC, q_pos0 + last - k_pos0 + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for j0 in range(0, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        m_col = cols < j_end
        kv_row = kv + cols.to(tl.int64)[:, None] * s_kv_t + i_h * s_kv_h
        kn = tl.load(kv_row + o_dn[None, :], mask=m_col[:, None] & m_dn[None, :], other=0.0)
        v = tl.load(kv_row + DN + o_dv[None, :], mask=m_col[:, None] & m_dv[None, :], other=0.0)
        kp = tl.load(kpe + cols.to(tl.int64)[:, None] * s_kp_t + o_dr[None, :],
                     mask=m_col[:, None] & m_dr[None, :], other=0.0)
        s = tl.dot(qn, tl.trans(kn), input_precision=PREC)
        s = tl.dot(qp, tl.trans(kp), s, input_precision=PREC)
        vis = m_col[None, :] & ((k_pos0 + cols)[None, :] <= q_pos[:, None])
        s = tl.where(vis, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse_c = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    o_ptr = o + rows.to(tl.int64)[:, None] * s_o_t + i_h * s_o_h + o_dv[None, :]
    l_ptr = lse + rows.to(tl.int64) * s_l_t + i_h
    m_out = m_row[:, None] & m_dv[None, :]
    if not IS_FIRST:
        lse_p = tl.load(l_ptr, mask=m_row, other=0.0)
        o_p = tl.load(o_ptr, mask=m_out, other=0.0).to(tl.float32)
        m_all = tl.maximum(lse_p, lse_c)  # lse_p is finite (chunk 0 holds key 0)
        w_p = tl.exp2(lse_p - m_all)
        w_c = tl.exp2(lse_c - m_all)
        out = (o_p * w_p[:, None] + out * w_c[:, None]) / (w_p + w_c)[:, None]
        lse_c = m_all + tl.log2(w_p + w_c)
    tl.store(o_ptr, out.to(o.dtype.element_ty), mask=m_out)
    tl.store(l_ptr, lse_c, mask=m_row)


def _attend_chunk(q, kv, kpe, o, lse, scale, q_pos0: int, k_pos0: int, Dn: int, Dv: int, is_first: bool) -> None:
    """Merge the attention of q [T, H, Dn + Dr] over one expanded key chunk into o [T, H, Dv], lse [T, H]."""
    T, H, Dqk = q.shape
    KC = kv.shape[0]
    Dr = Dqk - Dn
    fp32 = q.dtype == torch.float32
    if fp32:
        block_m, block_n, warps, stages = 64 if T > 32 else 32, 32, 4, 2
    else:
        block_m, block_n, warps, stages = TILES if T > 32 else (64, 64, 4, 3)
    _mla_prefill_kernel[(triton.cdiv(T, block_m), H)](
        q, kv, kpe, o, lse,
        scale * _LOG2E, T, KC, q_pos0, k_pos0,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kpe.stride(0), o.stride(0), o.stride(1),
        lse.stride(0),
        DN=Dn, DR=Dr, DV=Dv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DN=max(16, triton.next_power_of_2(Dn)),
        BLOCK_DR=max(16, triton.next_power_of_2(Dr)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        IS_FIRST=is_first, PREC="ieee" if fp32 else "tf32",
        num_warps=warps, num_stages=stages,
    )


def mla_prefill_sequence(q, latent_fn, L: int, w_kv_b, v_head_dim: int, scale: float, key_chunk: int,
                         out: torch.Tensor) -> None:
    """One sequence: q [T, H, Dn + Dr] are the last T of its L positions; `latent_fn(a, b)` returns the
    latents [b - a, R + Dr] of key positions a .. b - 1. Writes o [T, H, Dv] into `out`."""
    T, H, Dqk = q.shape
    R = w_kv_b.shape[1]
    Dn = w_kv_b.shape[0] // H - v_head_dim
    w = w_kv_b if w_kv_b.dtype == q.dtype else w_kv_b.to(q.dtype)
    chunks = [(a, min(a + key_chunk, L)) for a in range(0, L, key_chunk)]
    single = len(chunks) == 1
    o = out if single else torch.empty(T, H, v_head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    for i, (a, b) in enumerate(chunks):
        lat = latent_fn(a, b)
        kv = (lat[:, :R].to(q.dtype) @ w.t()).view(b - a, H, Dn + v_head_dim)
        _attend_chunk(q, kv, lat[:, R:].to(q.dtype), o, lse, scale, L - T, a, Dn, v_head_dim, i == 0)
    if not single:
        out.copy_(o)


def mla_prefill(q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor | None, block_tables: torch.Tensor | None,
                query_lens: list[int], context_lens: list[int], w_kv_b: torch.Tensor, v_head_dim: int,
                scale: float, *, key_chunk: int | None = None) -> torch.Tensor:
    """MLA attention of a mixed flat batch. Returns o [num_tokens, H, Dv] in q's dtype.

    q [num_tokens, H, Dn + Dr] and latent [num_tokens, R + Dr] (the new tokens' latents, back to back by
    sequence); cache [NB, BS, R + Dr] with every new latent already written (None: no context allowed);
    block_tables int32 [N, max_blocks]; query_lens / context_lens host lists [N]; w_kv_b [H * (Dn + Dv), R].
    """
    num_tokens, H, Dqk = q.shape
    Dn = w_kv_b.shape[0] // H - v_head_dim
    if any(c > 0 for c in context_lens) and cache is None:
        raise MLAError("mla_prefill: sequences with cached context need the latent cache")
    out = torch.empty(num_tokens, H, v_head_dim, dtype=q.dtype, device=q.device)
    if key_chunk is None:
        key_chunk = max(1, KEY_CHUNK_BYTES // (H * (Dn + v_head_dim) * q.element_size()))
    if cache is not None:
        BS = cache.shape[1]
        key_chunk = max(BS, key_chunk // BS * BS)
    starts, s = [], 0
    for n in query_lens:
        starts.append(s)
        s += n
    dec = [n for n, (ql, cl) in enumerate(zip(query_lens, context_lens)) if ql == 1 and cl > 0]
    if dec:
        rows = torch.tensor([starts[n] for n in dec], dtype=torch.long, device=q.device)
        seqs = torch.tensor(dec, dtype=torch.long, device=q.device)
        lens = torch.tensor([context_lens[n] + 1 for n in dec], dtype=torch.int32, device=q.device)
        out[rows] = mla_decode(q[rows], cache, block_tables[seqs], lens, w_kv_b, v_head_dim, scale).to(q.dtype)
    dec_set = set(dec)
    for n, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        if ql == 0 or n in dec_set:
            continue
        st = starts[n]
        if cl == 0:
            def latent_fn(a, b, st=st):
                return latent[st + a:st + b]
        else:
            table = block_tables[n]

            def latent_fn(a, b, table=table):
                first, last = a // BS, (b + BS - 1) // BS
                return cache[table[first:last].long()].view(-1, cache.shape[-1])[a - first * BS:b - first * BS]
        mla_prefill_sequence(q[st:st + ql], latent_fn, cl + ql, w_kv_b, v_head_dim, scale, key_chunk,
                             out[st:st + ql])
    return out
