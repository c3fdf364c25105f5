"""Forward KDA: the Aqk / Akk rows of one 16-token sub-chunk (its diagonal block and the blocks left
of it), after `chunk_intra`'s prep kernel has stored G, the inverse norms and zeros above the diagonal.

    Aqk[r, j] = sum_d qh[r, d] kh[j, d] exp2(G[r, d] - G[j, d])   (j <= r),
    Akk[r, j] = beta_r sum_d kh[r, d] kh[j, d] exp2(G[r, d] - G[j, d])   (j < r),
G the chunk-local cumulative log2 decay (non-increasing), qh = scale * q / |q|, kh = k / |k| (inverse
norms from the prep kernel when the norm is fused). Every product goes through the anchor a = G of the
row just before the sub-chunk (0 before the first): (qh_I exp2(G_I - a)) (kh_J exp2(a - G_J))^T, a
matmul whose row factors are <= 1.
  * Blocks left of the diagonal (J < I): the column factors are <= 1 too, for every gate magnitude.
  * The diagonal block: its column factors exp2(a - G_I) reach 2^span, span = max_d (a - G of the
    block's last row). While span <= SPAN (2^96; the products that underflow are below 2^-30 of their
    scale) the anchored matmul is exact (the entries above the diagonal are finite and masked). Beyond
    (unbounded gates: the released checkpoint's exp(A_log) reaches ~201, one token's log decay -2.7e3)
    `_exact_diag` takes the block: its two 8x8 diagonal blocks element by element, its lower-left 8x8
    block through the anchor of row 7.

One program per (sub-chunk, chunk, head), [16, BK] tiles. Aqk is in the compute dtype, Akk an fp32
scratch (strictly lower, times beta) that `chunk_intra`'s solve kernel inverts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import KDAError
from kimi_linear.ops.kda.chunk_utils import chunk_of_program, dot_precision, load_beta, pair_rows

SPAN = 96.0  # log2: the largest decay span of a diagonal block that its anchored matmul takes
MAX_SPAN = 100.0  # beyond, exp2(span) * |k| summed over 256 channels could overflow fp32 (2^128)


@triton.jit
def _rows(x_b, orow, m_r, stride, cols, m_c, r_b, H: tl.constexpr, USE_L2: tl.constexpr):
    """[R, BK] fp32 rows times their stored inverse norm (when the norm is fused)."""
    x = tl.load(x_b + orow[:, None] * stride + cols[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
    x = x.to(tl.float32)
    if USE_L2:
        x = x * tl.load(r_b + orow * H, mask=m_r, other=0.0)[:, None]
    return x


@triton.jit
def _exact_diag(qn, kn, G, b, k_b, G_b, rk_b, A_b, S_b, r0, n_valid, s_k, sHK, sHA, cols, m_c, H: tl.constexpr,
                BC: tl.constexpr, USE_L2: tl.constexpr, PREC: tl.constexpr):
    """The diagonal block for any gate magnitude: its two 8x8 diagonal blocks exactly, one column per step
    for both halves at once (rows 0..7 against column c, rows 8..15 against column 8 + c; step c's dots
    collect in column c of [16, 8] tiles: row r, column c holds the pair (r, c + 8 [r >= 8])), its
    lower-left 8x8 block through the anchor G of row 7 (both exponent factors <= 1) as a matmul, zeros in
    its upper-right 8x8 block."""
    o = tl.arange(0, BC)
    rows = r0 + o
    m_r = rows < n_valid
    zr = tl.zeros([BC, 1], dtype=tl.int32)
    m_bc = (zr == 0) & m_c[None, :]
    hi = o >= 8
    c8 = tl.arange(0, 8)
    Aq = tl.zeros([BC, 8], dtype=tl.float32)
    Ak = tl.zeros([BC, 8], dtype=tl.float32)
    for c in range(8):
        kc = pair_rows(k_b, r0 + c, s_k, cols, m_c, hi, n_valid, rk_b, H, USE_L2)
        Gc = pair_rows(G_b, r0 + c, sHK, cols, m_c, hi, n_valid, rk_b, H, False)
        t = tl.exp2(tl.minimum(G - Gc, 0.0)) * kc
        Aq = tl.where(c8[None, :] == c, tl.sum(qn * t, 1)[:, None], Aq)
        Ak = tl.where(c8[None, :] == c, tl.sum(kn * t, 1)[:, None], Ak)
    cc = c8[None, :] + tl.where(hi, 8, 0)[:, None]  # column of each entry within the sub-chunk
    p = rows[:, None] * sHA + r0 + cc
    tl.store(A_b + p, tl.where(o[:, None] >= cc, Aq, 0.0).to(A_b.dtype.element_ty), mask=m_r[:, None])
    tl.store(S_b + p, tl.where(o[:, None] > cc, Ak * b[:, None], 0.0), mask=m_r[:, None])
    pz = rows[:, None] * sHA + r0 + 8 + c8[None, :]
    m_z = m_r[:, None] & (~hi)[:, None]
    tl.store(A_b + pz, tl.zeros([BC, 8], dtype=A_b.dtype.element_ty), mask=m_z)
    tl.store(S_b + pz, tl.zeros([BC, 8], dtype=tl.float32), mask=m_z)
    # rows 8..15 x columns 0..7 through the anchor G of row 7 (row r0 + 7 may lie past the sequence's end,
    # even past the buffer's: then no row >= 8 exists and a7 is unused, but the load must not touch memory)
    a7 = tl.load(G_b + (r0 + 7) * sHK + zr + cols[None, :], mask=m_bc & (r0 + 7 < n_valid), other=0.0)
    E7 = tl.where(hi[:, None], tl.exp2(tl.minimum(G - a7, 0.0)), 0.0)
    kb7 = tl.trans(tl.where(hi[:, None], 0.0, kn * tl.exp2(tl.minimum(a7 - G, 0.0))))
    sq = tl.dot(qn * E7, kb7, input_precision=PREC)
    sk = tl.dot(kn * E7, kb7, input_precision=PREC)
    m_ll = m_r[:, None] & hi[:, None] & (o[None, :] < 8)
    pl = rows[:, None] * sHA + r0 + o[None, :]
    tl.store(A_b + pl, sq.to(A_b.dtype.element_ty), mask=m_ll)
    tl.store(S_b + pl, sk * b[:, None], mask=m_ll)


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_fwd_diag_kernel(
    q, k, beta, Go, rq_o, rk_o, Aqk, Akk_s, flags,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_q, s_k, s_b, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    SPAN_: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr, IS_VARLEN: tl.constexpr, USE_L2: tl.constexpr,
    USE_SIGMOID: tl.constexpr,
):
    i_tb = tl.program_id(0)
    i_t = i_tb // 4
    i_s = i_tb % 4
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    n, i_c, bos, eos, valid = chunk_of_program(i_t, i_b, T, N, NT_seq, cu_seqlens, chunk_seq,
                                               chunk_offsets, IS_VARLEN)
    if not valid:
        return
    tc = bos + i_c * BT  # first token of the chunk
    r0 = i_s * BC  # first row of the sub-chunk in the chunk
    if tc + r0 >= eos:
        return
    flag = flags + i_tb.to(tl.int64) * tl.num_programs(1) + i_bh  # 1: the exact launch takes this sub-chunk
    if EXACT:
        if tl.load(flag) == 0:
            return
    n_valid = tl.minimum(eos - tc, BT).to(tl.int32)  # rows of the chunk that exist
    sHK = H * K
    sHA = H * BT
    cols = tl.arange(0, BK)
    m_c = cols < K
    o = tl.arange(0, BC)
    rows = r0 + o
    m_r = rows < n_valid
    q_b = q + tc * s_q + i_h * K
    k_b = k + tc * s_k + i_h * K
    G_b = Go + tc * sHK + i_h * K
    rq_b = rq_o + tc * H + i_h
    rk_b = rk_o + tc * H + i_h
    A_b = Aqk + tc * sHA + i_h * BT
    S_b = Akk_s + tc * sHA + i_h * BT
    # anchor a: G of the row before the sub-chunk (0 before the first); row factors exp2(G - a) <= 1
    a = tl.load(G_b + (r0 - 1) * sHK + cols, mask=m_c & (i_s > 0), other=0.0)
    if not EXACT:
        # the diagonal block's column factors exp2(a - G) reach 2^span: too large, and the exact launch
        # takes the sub-chunk
        g_end = tl.load(G_b + (tl.minimum(r0 + BC, n_valid) - 1) * sHK + cols, mask=m_c, other=0.0)
        too_large = tl.max(a - g_end, 0) > SPAN_
        tl.store(flag, too_large.to(tl.int8))
        if too_large:
            return
    qn = _rows(q_b, rows, m_r, s_q, cols, m_c, rq_b, H, USE_L2) * scale
    kn = _rows(k_b, rows, m_r, s_k, cols, m_c, rk_b, H, USE_L2)
    G = tl.load(G_b + rows[:, None] * sHK + cols[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
    b = load_beta(beta + tc * s_b + i_h, rows, m_r, s_b, USE_SIGMOID)
    if EXACT:
        _exact_diag(qn, kn, G, b, k_b, G_b, rk_b, A_b, S_b, r0, n_valid, s_k, sHK, sHA, cols, m_c, H, BC, USE_L2,
                    PREC)
    E = tl.exp2(tl.minimum(G - a[None, :], 0.0))
    qa = qn * E
    ka = kn * E
    if not EXACT:
        kb = tl.trans(kn * tl.exp2(tl.minimum(a[None, :] - G, SPAN_)))
        sq = tl.dot(qa, kb, input_precision=PREC)
        sk = tl.dot(ka, kb, input_precision=PREC)
        p = rows[:, None] * sHA + r0 + o[None, :]
        tl.store(A_b + p, tl.where(o[:, None] >= o[None, :], sq, 0.0).to(A_b.dtype.element_ty), mask=m_r[:, None])
        tl.store(S_b + p, tl.where(o[:, None] > o[None, :], sk * b[:, None], 0.0), mask=m_r[:, None])
    # ---- blocks left of the diagonal through the same anchor, one 16-column block J at a time: the column
    # factors exp2(a - G_J) <= 1 for every gate magnitude
    for J in range(i_s):
        rj = J * BC + o
        m_j = rj < n_valid
        kj = _rows(k_b, rj, m_j, s_k, cols, m_c, rk_b, H, USE_L2)
        Gj = tl.load(G_b + rj[:, None] * sHK + cols[None, :], mask=m_j[:, None] & m_c[None, :], other=0.0)
        kb = tl.trans(kj * tl.exp2(tl.minimum(a[None, :] - Gj, 0.0)))
        sq = tl.dot(qa, kb, input_precision=PREC)
        sk = tl.dot(ka, kb, input_precision=PREC)
        pj = rows[:, None] * sHA + J * BC + o[None, :]
        tl.store(A_b + pj, sq.to(A_b.dtype.element_ty), mask=m_r[:, None])
        tl.store(S_b + pj, sk * b[:, None], mask=m_r[:, None])


def chunk_fwd_diag_launch(q, k, beta, scale, idx, T, bufs, *, use_l2, use_sigmoid, num_warps=2, num_stages=1,
                          exact_warps=2, span=SPAN):
    """Aqk / Akk rows of every sub-chunk into bufs["Aqk"] and bufs["Akk"]; needs bufs["G"] (and the
    inverse norms bufs["rq"], bufs["rk"] with the fused norm) from the prep kernel. Two launches: the
    anchored one for every sub-chunk whose diagonal block's span allows it (it flags the others), then
    the exact one for the flagged sub-chunks (its other programs exit after one flag read)."""
    if not span <= MAX_SPAN:  # (NaN too)
        raise KDAError(f"intra span {span} must be <= {MAX_SPAN} (log2): larger column factors exp2(span) "
                       "overflow fp32 in the anchored products")
    H, K = q.shape[-2], q.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    B = 1 if idx.chunk_seq is not None else idx.N
    grid = (4 * (idx.NT if idx.chunk_seq is not None else idx.NT_seq), B * H)
    prec = dot_precision(q.dtype)
    flags = torch.empty(grid, device=q.device, dtype=torch.int8)
    for exact, warps in ((False, num_warps), (True, exact_warps)):
        chunk_kda_fwd_diag_kernel[grid](
            q, k, beta, bufs["G"], bufs.get("rq"), bufs.get("rk"), bufs["Aqk"], bufs["Akk"], flags,
            bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
            T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), beta.stride(-2), scale,
            H=H, K=K, BK=BK, BT=64, BC=16, SPAN_=float(span), EXACT=exact, PREC=prec,
            IS_VARLEN=idx.chunk_seq is not None, USE_L2=use_l2, USE_SIGMOID=use_sigmoid,
            num_warps=warps, num_stages=num_stages,
        )
