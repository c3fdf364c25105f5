"""MLA decode in the absorbed (MQA) form over the paged latent cache: split-KV Triton kernels.

One query token per sequence (spec section 5.2). W_UK is folded into the query and W_UV applied after
the attention (two batched matmuls, cuBLAS); the kernels do the attention of the H query heads over the
shared latent keys/values [c (R) ; k_pe (Dr)] of every cached token:

    score[h, s] = scale * (q_lat[h] . c[s] + q_pe[h] . k_pe[s]),   o_lat[h] = sum_s softmax(score)[h, s] c[s]

Design and invariants:
- MQA: a program owns BLOCK_H heads of one sequence and one context split, and reads each cached token
  once for all of its heads (the [BLOCK_N, R] latent tile is both the key and the value operand).
- Split-KV: the grid is (head groups, NUM_SPLITS, N), fixed by shapes. Each program derives its token
  range from seq_lens on the device: chunk = max(cdiv(L, NUM_SPLITS), MIN_CHUNK) rounded up to BLOCK_N,
  split s covers [s * chunk, min((s + 1) * chunk, L)); a split past L does nothing.
- Online softmax in fp32 (exp2, scale folded with log2(e)); each split writes its normalised partial
  output and log2-sum-exp; a reduction kernel merges the active splits of each (sequence, head) and
  writes o_lat in the model dtype, or zeros for a padding row (seq_len 0: nothing is read).
- CUDA-graph safe: no host sync; the grid depends on shapes only; the split scratch lives in `extras`
  (reused across layers and steps while the shapes match) or is allocated by shape.
- The cache may be float8_e4m3fn (`--kv-cache-dtype fp8`, static scale 1.0): tiles are upcast to the query's
  dtype as they are loaded, so the kernel reads half the bytes and computes as for a bf16 cache; each
  tile is loaded twice (`dual_load`, its default there), once per dot, so that both loads stay on
  Triton's pipelined async copies (one load feeding both dots through the upcast is copied synchronously).
- Any power-of-two block size (tile rows are gathered per token, a tile may span several blocks); any
  seq_len from 0 up (int64 cache offsets, int32 positions); table entries past a length are never read.

Schedule: S = Q K^T with the heads as the MMA M dimension (mma.sync), 4 warps, 32-token tiles
(16 in fp32), Triton's pipeliner, the next tile's block ids read one iteration ahead; the reduction runs
one program per (sequence, head, 128 values) over the active splits, 64 splits per vector load. Measured
figures are in benchmarks/RESULTS.md (`benchmarks/mla_decode.py`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MLAError

_LOG2E = 1.4426950408889634
MIN_CHUNK = 64  # fewest tokens a split takes before another split is used (64 beat 128..1024 at 4K, "heads")
MAX_SPLITS = 512
REDUCE_BLOCK_S = 64  # splits the reduction merges per vector load ([64, 128] fp32 partial tiles, 4 warps)


@triton.jit
def _mla_decode_split_kernel(
    q_lat, q_pe, cache, block_tables, seq_lens, part_o, part_lse,
    scale_log2,
    s_ql_h, s_ql_n, s_qp_n, s_qp_h, s_c_blk, s_c_tok, s_bt_n,
    s_po_n, s_po_s, s_po_h, s_pl_n, s_pl_s,
    NUM_SPLITS,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    PREC: tl.constexpr, PREFETCH: tl.constexpr, DUAL_LOAD: tl.constexpr,
):
    i_hg = tl.program_id(0)
    i_s = tl.program_id(1)
    i_n = tl.program_id(2)

    L = tl.load(seq_lens + i_n)
    chunk = tl.maximum((L + NUM_SPLITS - 1) // NUM_SPLITS, MIN_CHUNK)
    chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = i_s * chunk
    end = tl.minimum(start + chunk, L)

    o_h = i_hg * BLOCK_H + tl.arange(0, BLOCK_H)
    o_r = tl.arange(0, BLOCK_R)
    o_p = tl.arange(0, BLOCK_DR)
    m_h = o_h < H
    m_r = o_r < R
    m_p = o_p < DR
    q_l = tl.load(q_lat + o_h[:, None] * s_ql_h + i_n * s_ql_n + o_r[None, :],
                  mask=m_h[:, None] & m_r[None, :], other=0.0)
    q_p = tl.load(q_pe + i_n * s_qp_n + o_h[:, None] * s_qp_h + o_p[None, :],
                  mask=m_h[:, None] & m_p[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    table = block_tables + i_n.to(tl.int64) * s_bt_n
    if PREFETCH:  # read the block ids of the next tile one iteration ahead
        nxt = start + tl.arange(0, BLOCK_N)
        blk_next = tl.load(table + nxt // BS, mask=nxt < end, other=0)
    for off in range(start, end, BLOCK_N):
        pos = off + tl.arange(0, BLOCK_N)
        m_n = pos < end
        if PREFETCH:
            blk = blk_next.to(tl.int64)
            nxt = pos + BLOCK_N
            blk_next = tl.load(table + nxt // BS, mask=nxt < end, other=0)
        else:
            blk = tl.load(table + pos // BS, mask=m_n, other=0).to(tl.int64)
        row = cache + blk * s_c_blk + (pos % BS).to(tl.int64) * s_c_tok
        # an fp8 latent cache (static scale 1.0) is upcast in registers to the query's dtype
        c = tl.load(row[:, None] + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0).to(q_l.dtype)
        if DUAL_LOAD:  # the key operand loaded again, already transposed: each load feeds one dot
            ct = tl.load(row[None, :] + o_r[:, None], mask=m_r[:, None] & m_n[None, :], other=0.0).to(q_l.dtype)
            kpt = tl.load(row[None, :] + R + o_p[:, None], mask=m_p[:, None] & m_n[None, :], other=0.0)
            s = tl.dot(q_l, ct, input_precision=PREC)
            s = tl.dot(q_p, kpt.to(q_l.dtype), s, input_precision=PREC)
        else:
            kp = tl.load(row[:, None] + R + o_p[None, :], mask=m_n[:, None] & m_p[None, :], other=0.0)
            s = tl.dot(q_l, tl.trans(c), input_precision=PREC)
            s = tl.dot(q_p, tl.trans(kp.to(q_l.dtype)), s, input_precision=PREC)
        s = tl.where(m_n[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=PREC)
        m_i = m_new

    active = start < L
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_base = part_o + i_n.to(tl.int64) * s_po_n + i_s.to(tl.int64) * s_po_s
    tl.store(o_base + o_h[:, None] * s_po_h + o_r[None, :], acc / l_safe[:, None],
             mask=(m_h[:, None] & m_r[None, :]) & active)
    tl.store(part_lse + i_n.to(tl.int64) * s_pl_n + i_s * s_pl_s + o_h, m_i + tl.log2(l_safe),
             mask=m_h & active)


@triton.jit
def _mla_decode_reduce_kernel(
    part_o, part_lse, seq_lens, o_lat,
    s_po_n, s_po_s, s_po_h, s_pl_n, s_pl_s, s_ol_h, s_ol_n,
    R, NUM_SPLITS,
    MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_RR: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_r = tl.program_id(2)

    L = tl.load(seq_lens + i_n)
    chunk = tl.maximum((L + NUM_SPLITS - 1) // NUM_SPLITS, MIN_CHUNK)
    chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    num_active = (L + chunk - 1) // chunk  # 0 for a padding row

    # one pass over the active splits, BLOCK_S at a time (vector loads, no serial per-split chain), the
    # running max and denominator rescaled as in the split kernel
    lse_base = part_lse + i_n.to(tl.int64) * s_pl_n + i_h
    o_base = part_o + i_n.to(tl.int64) * s_po_n + i_h * s_po_h
    o_r = i_r * BLOCK_RR + tl.arange(0, BLOCK_RR)
    m_r = o_r < R
    m = tl.full([], float("-inf"), dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_RR], dtype=tl.float32)
    for s0 in range(0, num_active, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)
        m_s = o_s < num_active
        lse = tl.load(lse_base + o_s * s_pl_s, mask=m_s, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))  # finite: split s0 is active
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # masked splits: exp2(-inf) = 0
        part = tl.load(o_base + o_s[:, None].to(tl.int64) * s_po_s + o_r[None, :],
                       mask=m_s[:, None] & m_r[None, :], other=0.0)
        den = den * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m = m_new
    den = tl.where(den > 0, den, 1.0)  # a padding row (no active split): zeros
    tl.store(o_lat + i_h * s_ol_h + i_n.to(tl.int64) * s_ol_n + o_r, (acc / den).to(o_lat.dtype.element_ty),
             mask=m_r)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def decode_num_splits(num_seqs: int, num_heads: int, device: torch.device, block_h: int = 32) -> int:
    """Splits per sequence for a batch of `num_seqs`, a shape-only rule: about two programs per SM, at
    least 4 (132 SMs: batch 1 -> 264, 8 -> 33, 256 -> 4)."""
    units = max(1, num_seqs) * triton.cdiv(num_heads, block_h)
    return max(4, min(MAX_SPLITS, triton.cdiv(2 * _sms(device), units)))


def _workspace(extras: dict | None, N: int, S: int, H: int, R: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split scratch [N, S, H, R] + [N, S, H] fp32, cached in `extras` while the shapes stay the same."""
    key = (N, S, H, R, str(device))
    ws = extras.get("mla_decode_ws") if extras is not None else None
    if ws is None or ws[0] != key:
        ws = (key, torch.empty(N, S, H, R, dtype=torch.float32, device=device),
              torch.empty(N, S, H, dtype=torch.float32, device=device))
        if extras is not None:
            extras["mla_decode_ws"] = ws
    return ws[1], ws[2]


def _default_config(H: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> dict:
    # measured on an H100 at batch 1 / 1M tokens: 4 warps, 32-token tiles, all 32 heads in one program
    # beat 8 warps (1.5x), 64-token tiles and 16-head groups. An fp8 cache loads each tile twice (H200,
    # 1M tokens: 730 vs 840 us): with one load per dot the upcast tiles stay on the pipelined async copies
    block_h = min(32, max(16, triton.next_power_of_2(H)))
    return dict(block_h=block_h, block_n=16 if dtype == torch.float32 else 32, num_warps=4, num_stages=2,
                prefetch=False, dual_load=cache_dtype == torch.float8_e4m3fn)


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, extras: dict | None = None, *,
                         num_splits: int | None = None, min_chunk: int = MIN_CHUNK, block_h: int | None = None,
                         block_n: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, prefetch: bool | None = None,
                         dual_load: bool | None = None) -> torch.Tensor:
    """Attention over the paged latent cache (MQA form). Returns o_lat [H, N, R] in q_lat's dtype.

    q_lat [H, N, R] (the absorbed query, any strides with a unit last stride); q_pe [N, H, Dr] (unit last
    stride); cache [NB, BS, R + Dr]; block_tables int32 [N, max_blocks]; seq_lens int32 [N] (0 = padding
    row: its output is zeros). The keyword arguments override the launch configuration (tests, sweeps);
    `prefetch` reads the next tile's block ids one iteration ahead; `dual_load` loads each latent tile twice,
    once transposed for Q K^T and once for P V, so that each load feeds one dot (the default over an fp8
    cache, whose upcast sits between the load and both dots).
    """
    H, N, R = q_lat.shape
    Dr = q_pe.shape[-1]
    NB, BS, D = cache.shape
    if D != R + Dr:
        raise MLAError(f"mla_decode_attention: latent cache rows hold {D} values, expected R + Dr = {R} + {Dr}")
    if BS & (BS - 1):
        raise MLAError(f"mla_decode_attention: the kernel needs a power-of-two block size, got {BS}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or cache.stride(-1) != 1 or cache.stride(1) != D:
        raise MLAError("mla_decode_attention: q_lat, q_pe and cache need a unit last stride and dense cache rows")
    cfg = _default_config(H, q_lat.dtype, cache.dtype)
    block_h = block_h or cfg["block_h"]
    block_n = block_n or cfg["block_n"]
    S = num_splits or decode_num_splits(N, H, q_lat.device, block_h)
    part_o, part_lse = _workspace(extras, N, S, H, R, q_lat.device)
    o_lat = torch.empty(H, N, R, dtype=q_lat.dtype, device=q_lat.device)
    if N == 0:
        return o_lat
    prec = "ieee" if q_lat.dtype == torch.float32 else "tf32"
    block_tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    seq_lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
    pre = cfg["prefetch"] if prefetch is None else prefetch
    dual = cfg["dual_load"] if dual_load is None else dual_load
    _mla_decode_split_kernel[(triton.cdiv(H, block_h), S, N)](
        q_lat, q_pe, cache, block_tables, seq_lens, part_o, part_lse,
        scale * _LOG2E,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        S,
        H=H, R=R, DR=Dr, BS=BS, MIN_CHUNK=min_chunk, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_DR=max(16, triton.next_power_of_2(Dr)), PREC=prec,
        PREFETCH=pre, DUAL_LOAD=dual, num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"],
    )
    args = (part_o, part_lse, seq_lens, o_lat, part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), o_lat.stride(0), o_lat.stride(1), R, S)
    block_s = min(REDUCE_BLOCK_S, triton.next_power_of_2(S))
    block_rr = min(128, triton.next_power_of_2(R))
    _mla_decode_reduce_kernel[(N, H, triton.cdiv(R, block_rr))](
        *args, MIN_CHUNK=min_chunk, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_RR=block_rr, num_warps=4)
    return o_lat


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               w_kv_b: torch.Tensor, v_head_dim: int, scale: float, extras: dict | None = None,
               **launch) -> torch.Tensor:
    """Absorbed MLA decode: one query per sequence over its cached latents. Returns o [N, H, Dv] (q's dtype).

    q [N, H, Dn + Dr] (nope part first); cache [NB, BS, R + Dr] holding every attended token, the current
    one included; block_tables int32 [N, max_blocks]; seq_lens int32 [N] (0 = padding row -> zeros);
    w_kv_b [H * (Dn + Dv), R] (kv_b_proj.weight, per head [k_nope (Dn); v (Dv)] rows). The result is a
    [N, H, Dv] view of an [H, N, Dv] tensor (callers reshape it, which copies once).
    """
    N, H, Dqk = q.shape
    R = w_kv_b.shape[1]
    Dr = cache.shape[-1] - R
    Dn = Dqk - Dr
    if w_kv_b.shape[0] != H * (Dn + v_head_dim):
        raise MLAError(f"mla_decode: kv_b_proj weight has {w_kv_b.shape[0]} rows, expected H * (Dn + Dv) = "
                       f"{H} * ({Dn} + {v_head_dim})")
    w = w_kv_b.view(H, Dn + v_head_dim, R)
    if w.dtype != q.dtype:
        w = w.to(q.dtype)
    q_lat = torch.bmm(q[..., :Dn].transpose(0, 1), w[:, :Dn])  # [H, N, R]
    o_lat = mla_decode_attention(q_lat, q[..., Dn:], cache, block_tables, seq_lens, scale, extras, **launch)
    return torch.bmm(o_lat, w[:, Dn:].transpose(1, 2)).transpose(0, 1)  # [N, H, Dv]


__all__ = ["mla_decode", "mla_decode_attention", "decode_num_splits"]
