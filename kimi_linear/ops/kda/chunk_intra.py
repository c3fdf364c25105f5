"""Forward intra-chunk KDA kernel: everything that is local to one 64-token chunk of one head.

One program per (chunk, head), in fp32:
  gate g = -exp(A_log) softplus(f + dt_bias) (or a given log decay) and its chunk-local cumsum G
  (log2 units, written to a [T_total, H, K] buffer: later single-row loads replace register
  reductions), q/k L2 norm (eps 1e-6 inside the sqrt; inverse norms to [T_total, H]), q scale, beta,
  Aqk[r, j] = sum_d qh_r k_j exp(G_r - G_j)  (j <= r) and Akk[r, j] = beta_r sum_d k_r k_j exp(G_r - G_j)
  (j < r), by 16x16 blocks and K slices of 32 columns: off-diagonal blocks through an anchor (the G
  just before the row block, so both exponent factors are <= 0) and a matmul; diagonal blocks exactly,
  column by column (Akk goes to an fp32 scratch),
  M = (I + Akk)^-1: diagonal 16x16 blocks as (I - A)(I + A^2)(I + A^4)(I + A^8) (A^16 = 0), merged by
  block-triangular formulas (fp32 products), stored in the compute dtype,
  W = M diag(beta) (exp(G) k), U = M diag(beta) v, Qg = qh exp(G), Kd = k exp(G_last - G).
Outputs go to token-indexed buffers [T_total, H, *] (rows past a sequence end are never written);
the decay of the whole chunk, G_last (log2 units), to a chunk-indexed buffer [NT, H, K].
Register budget (checked with ptxas for sm_90): small [16, 32] tiles, 32-bit offsets inside tiles,
[16]-row vectors reloaded where needed instead of kept live.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import (chunk_of_program, gate_log2, load_beta, load_tile, load_vec,
                                             store_tile)


@triton.jit
def _prep_block(q_h, k_h, f_h, Qg_h, Go_h, rq_o, rk_o, tok, m_r, s_q, s_k, s_f, sHK, cols, m_c, dtb, neg_a, a,
                scale, H: tl.constexpr, BC: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr,
                USE_L2: tl.constexpr, EVEN_K: tl.constexpr):
    """Gate, chunk-local cumsum (from the prefix `a`) and norms of the row block starting at token `tok`;
    stores G, Qg and the inverse norms. Returns G of the last row (the next prefix)."""
    o = tl.arange(0, BC)
    bq = load_tile(q_h + tok * s_q, o, m_r, s_q, cols, m_c, EVEN_K)
    bk = load_tile(k_h + tok * s_k, o, m_r, s_k, cols, m_c, EVEN_K)
    if USE_L2:
        rq = 1.0 / tl.sqrt(tl.sum(bq * bq, 1) + 1e-6)
        rk = 1.0 / tl.sqrt(tl.sum(bk * bk, 1) + 1e-6)
    else:
        rq = tl.full([BC], 1.0, tl.float32)
        rk = tl.full([BC], 1.0, tl.float32)
    g = gate_log2(f_h + tok * s_f, o, m_r, s_f, cols, m_c, dtb, neg_a, USE_GATE, HAS_DTB, EVEN_K)
    G = a[None, :] + tl.cumsum(g, 0)
    store_tile(Go_h + tok * sHK, G, o, m_r, sHK, cols, m_c, EVEN_K)
    store_tile(Qg_h + tok * sHK, bq * (rq * scale)[:, None] * tl.exp2(G), o, m_r, sHK, cols, m_c, EVEN_K)
    if USE_L2:
        tl.store(rq_o + (tok + o) * H, rq, mask=m_r)
        tl.store(rk_o + (tok + o) * H, rk, mask=m_r)
    return a + tl.sum(g, 0)


@triton.jit
def _row_vecs(rq_o, rk_o, b_h, tok, m_r, s_b, H: tl.constexpr, BC: tl.constexpr, USE_L2: tl.constexpr,
              USE_SIGMOID: tl.constexpr):
    """(1/|q|, 1/|k|, beta) of a row block, reloaded where needed: [16] row vectors sit replicated in
    every thread of the wide tiles' layout, so keeping twelve of them live costs ~200 registers."""
    o = tl.arange(0, BC)
    if USE_L2:
        rq = tl.load(rq_o + (tok + o) * H, mask=m_r, other=0.0)
        rk = tl.load(rk_o + (tok + o) * H, mask=m_r, other=0.0)
    else:
        rq = tl.full([BC], 1.0, tl.float32)
        rk = tl.full([BC], 1.0, tl.float32)
    b = load_beta(b_h + tok * s_b, o, m_r, s_b, USE_SIGMOID)
    return rq, rk, b


@triton.jit
def _kn_G(k_h, Go_h, tok, m_r, s_k, sHK, rk, cols, m_c, BC: tl.constexpr, EVEN_K: tl.constexpr):
    """Normalised k and G of a row block, reloaded (L1/L2) instead of kept in registers."""
    o = tl.arange(0, BC)
    kn = load_tile(k_h + tok * s_k, o, m_r, s_k, cols, m_c, EVEN_K) * rk[:, None]
    G = load_tile(Go_h + tok * sHK, o, m_r, sHK, cols, m_c, EVEN_K)
    return kn, G


@triton.jit
def _off_slice(qa, ka, k_h, Go_h, tok_j, m_j, rk_j, a, s_k, sHK, kk, cs, m_s, accq, acck, BC: tl.constexpr,
               EVEN_K: tl.constexpr):
    """One K slice of an off-diagonal block pair: the column block's keys times exp2(a - G_j) <= 1."""
    o = tl.arange(0, BC)
    kj = load_tile(k_h + tok_j * s_k + kk, o, m_j, s_k, cs, m_s, EVEN_K) * rk_j[:, None]
    Gj = load_tile(Go_h + tok_j * sHK + kk, o, m_j, sHK, cs, m_s, EVEN_K)
    kj = tl.trans(kj * tl.exp2(tl.minimum(a[None, :] - Gj, 0.0)))
    return tl.dot(qa, kj, accq), tl.dot(ka, kj, acck)


@triton.jit
def _row_block(q_h, k_h, Go_h, A_h, S_h, rq_h, rk_h, b_h, t0, I: tl.constexpr, eos, s_q, s_k, s_b, sHK, sHA,
               scale, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr, BC: tl.constexpr,
               EVEN_K: tl.constexpr, USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """Row block I (16 rows) of Aqk and Akk, stored (Akk to the fp32 scratch), by K slices of BKC columns.
    Diagonal block: exact, column by column (the column's k and G rows are loads, the products reduce
    along the slice, inside a warp). Off-diagonal blocks J < I: through the anchor a = G of the row
    just before the block, as matmuls of exp2(G - a) q / k (<= 1) with exp2(a - G_j) k_j (<= 1)."""
    o = tl.arange(0, BC)
    cs = tl.arange(0, BKC)
    tok = t0 + I * BC
    m_r = o < eos - tok
    rq, rk, b = _row_vecs(rq_h, rk_h, b_h, tok, m_r, s_b, H, BC, USE_L2, USE_SIGMOID)
    rk0, rk1, rk2 = rk, rk, rk
    if I > 0:
        rk0 = _row_vecs(rq_h, rk_h, b_h, t0, o < eos - t0, s_b, H, BC, USE_L2, USE_SIGMOID)[1]
    if I > 1:
        rk1 = _row_vecs(rq_h, rk_h, b_h, t0 + BC, o < eos - t0 - BC, s_b, H, BC, USE_L2, USE_SIGMOID)[1]
    if I > 2:
        rk2 = _row_vecs(rq_h, rk_h, b_h, t0 + 2 * BC, o < eos - t0 - 2 * BC, s_b, H, BC, USE_L2, USE_SIGMOID)[1]
    Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    Akk = tl.zeros([BC, BC], dtype=tl.float32)
    q0 = tl.zeros([BC, BC], dtype=tl.float32)
    k0 = tl.zeros([BC, BC], dtype=tl.float32)
    q1 = tl.zeros([BC, BC], dtype=tl.float32)
    k1 = tl.zeros([BC, BC], dtype=tl.float32)
    q2 = tl.zeros([BC, BC], dtype=tl.float32)
    k2 = tl.zeros([BC, BC], dtype=tl.float32)
    nc = tl.minimum(eos - tok, BC).to(tl.int32)
    for kk in range(0, BK, BKC):
        m_s = kk + cs < K
        qs = load_tile(q_h + tok * s_q + kk, o, m_r, s_q, cs, m_s, EVEN_K) * (rq * scale)[:, None]
        ks = load_tile(k_h + tok * s_k + kk, o, m_r, s_k, cs, m_s, EVEN_K) * rk[:, None]
        Gs = load_tile(Go_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
        for c in range(nc):  # runtime bound: no unrolling, no hoisting of the row loads
            k_c = load_vec(k_h + (tok + c) * s_k + kk, cs, m_s, True, EVEN_K)
            G_c = load_vec(Go_h + (tok + c) * sHK + kk, cs, m_s, True, EVEN_K)
            t = tl.exp2(tl.minimum(Gs - G_c[None, :], 0.0)) * k_c[None, :]
            aq = tl.sum(qs * t, 1)
            ak = tl.sum(ks * t, 1)
            Aqk = tl.where(o[None, :] == c, Aqk + aq[:, None], Aqk)
            Akk = tl.where(o[None, :] == c, Akk + ak[:, None], Akk)
        if I > 0:
            a = load_vec(Go_h + (tok - 1) * sHK + kk, cs, m_s, tok - 1 < eos, EVEN_K)
            e = tl.exp2(tl.minimum(Gs - a[None, :], 0.0))
            qa = qs * e
            ka = ks * e
            q0, k0 = _off_slice(qa, ka, k_h, Go_h, t0, o < eos - t0, rk0, a, s_k, sHK, kk, cs, m_s, q0, k0, BC, EVEN_K)
            if I > 1:
                q1, k1 = _off_slice(qa, ka, k_h, Go_h, t0 + BC, o < eos - t0 - BC, rk1, a, s_k, sHK, kk, cs, m_s, q1, k1,
                                    BC, EVEN_K)
            if I > 2:
                q2, k2 = _off_slice(qa, ka, k_h, Go_h, t0 + 2 * BC, o < eos - t0 - 2 * BC, rk2, a, s_k, sHK, kk, cs, m_s, q2, k2,
                                    BC, EVEN_K)
    zb = tl.zeros([BC, BC], dtype=tl.float32)
    bb = b[:, None]
    _store_blk(A_h, q0, tok, m_r, sHA, 0, BC)
    _store_blk(S_h, k0 * bb, tok, m_r, sHA, 0, BC)
    _store_blk(A_h, q1, tok, m_r, sHA, BC, BC)
    _store_blk(S_h, k1 * bb, tok, m_r, sHA, BC, BC)
    _store_blk(A_h, q2, tok, m_r, sHA, 2 * BC, BC)
    _store_blk(S_h, k2 * bb, tok, m_r, sHA, 2 * BC, BC)
    _store_blk(A_h, zb, tok, m_r, sHA, 3 * BC, BC)
    _store_blk(S_h, zb, tok, m_r, sHA, 3 * BC, BC)
    rkc = rk[None, :]
    _store_blk(A_h, tl.where(o[:, None] >= o[None, :], Aqk * rkc, 0.0), tok, m_r, sHA, I * BC, BC)
    _store_blk(S_h, tl.where(o[:, None] > o[None, :], Akk * bb * rkc, 0.0), tok, m_r, sHA, I * BC, BC)


@triton.jit
def _inv_unit_lower(A, BC: tl.constexpr):
    """(I + A)^-1 = (I - A)(I + A^2)(I + A^4)(I + A^8) for a strictly lower triangular 16x16 A (A^16 = 0):
    six small fp32 matmuls, no row-by-row substitution."""
    o = tl.arange(0, BC)
    Id = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    X = Id - A
    P = tl.dot(A, A, input_precision="ieee")
    X = tl.dot(X, Id + P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = tl.dot(X, Id + P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X = tl.dot(X, Id + P, input_precision="ieee")
    return X


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _store_blk(A_h, x, tok, m_r, sHA, col0, BC: tl.constexpr):
    o = tl.arange(0, BC)
    store_tile(A_h + tok * sHA + col0, x, o, m_r, sHA, o, o < BC, True)


@triton.jit
def _store_arow(A_h, tok, m_r, sHA, x0, x1, x2, x3, BC: tl.constexpr):
    """One 16-row block of a [BT, BT] matrix: four 16x16 column blocks."""
    o = tl.arange(0, BC)
    base = A_h + tok * sHA
    store_tile(base, x0, o, m_r, sHA, o, o < BC, True)
    store_tile(base + BC, x1, o, m_r, sHA, o, o < BC, True)
    store_tile(base + 2 * BC, x2, o, m_r, sHA, o, o < BC, True)
    store_tile(base + 3 * BC, x3, o, m_r, sHA, o, o < BC, True)


@triton.jit
def _load_blk(A_h, tok, m_r, sHA, col0, BC: tl.constexpr):
    """A 16x16 block (rows from token `tok`, columns col0..col0+15) of a [BT, BT] per-token matrix."""
    o = tl.arange(0, BC)
    return load_tile(A_h + tok * sHA + col0, o, m_r, sHA, o, o < BC, True)


@triton.jit
def _y_block(k_h, Go_h, tok, m_r, s_k, sHK, rk, b, cols, m_c, dt: tl.constexpr, BC: tl.constexpr,
             EVEN_K: tl.constexpr):
    kn, G = _kn_G(k_h, Go_h, tok, m_r, s_k, sHK, rk, cols, m_c, BC, EVEN_K)
    return (kn * b[:, None] * tl.exp2(G)).to(dt)


@triton.jit
def _kd_block(Kd_h, k_h, Go_h, tok, m_r, s_k, sHK, rk, glast, cols, m_c, BC: tl.constexpr, EVEN_K: tl.constexpr):
    kn, G = _kn_G(k_h, Go_h, tok, m_r, s_k, sHK, rk, cols, m_c, BC, EVEN_K)
    o = tl.arange(0, BC)
    store_tile(Kd_h + tok * sHK, kn * tl.exp2(tl.minimum(glast[None, :] - G, 0.0)), o, m_r, sHK, cols, m_c, EVEN_K)


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q, k, v, f, beta, A_log, dt_bias,
    Wt, U, Kd, Qg, Aqk, gam, Mo, Go, rq_o, rk_o, Akk_s,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_q, s_k, s_v, s_f, s_b, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr, USE_L2: tl.constexpr,
    USE_SIGMOID: tl.constexpr, SAVE: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    n, i_c, bos, eos, valid = chunk_of_program(i_t, i_b, T, N, NT_seq, cu_seqlens, chunk_seq,
                                               chunk_offsets, IS_VARLEN)
    if not valid:
        return
    if IS_VARLEN:
        gc = i_t.to(tl.int64)
    else:
        gc = (i_b * NT_seq + i_t).to(tl.int64)
    EVEN_K: tl.constexpr = K == BK
    EVEN_V: tl.constexpr = V == BV
    BKC: tl.constexpr = 32 if BK > 32 else BK
    t0 = bos + i_c * BT
    o = tl.arange(0, BC)
    cols = tl.arange(0, BK)
    m_c = cols < K
    if USE_GATE:
        neg_a = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if HAS_DTB:
            dtb = tl.load(dt_bias + i_h * K + cols, mask=m_c, other=0.0).to(tl.float32)
        else:
            dtb = tl.zeros([BK], dtype=tl.float32)
    else:
        neg_a = 0.0
        dtb = tl.zeros([BK], dtype=tl.float32)
    sHK = H * K
    sHA = H * BT
    dt = Wt.dtype.element_ty
    q_h = q + i_h * K
    k_h = k + i_h * K
    f_h = f + i_h * K
    b_h = beta + i_h
    Go_h = Go + i_h * K
    Qg_h = Qg + i_h * K
    A_h = Aqk + i_h * BT
    tk0 = t0
    tk1 = t0 + BC
    tk2 = t0 + 2 * BC
    tk3 = t0 + 3 * BC
    m0 = o < eos - tk0
    m1 = o < eos - tk1
    m2 = o < eos - tk2
    m3 = o < eos - tk3

    # ---- gate, cumulative decay G (stored: later loads of single rows replace reductions), norms
    a0 = tl.zeros([BK], dtype=tl.float32)
    rq_h = rq_o + i_h
    rk_h = rk_o + i_h
    a1 = _prep_block(q_h, k_h, f_h, Qg_h, Go_h, rq_h, rk_h, tk0, m0, s_q, s_k, s_f, sHK, cols, m_c, dtb, neg_a, a0,
                     scale, H, BC, USE_GATE, HAS_DTB, USE_L2, EVEN_K)
    a2 = _prep_block(q_h, k_h, f_h, Qg_h, Go_h, rq_h, rk_h, tk1, m1, s_q, s_k, s_f, sHK, cols, m_c, dtb, neg_a, a1,
                     scale, H, BC, USE_GATE, HAS_DTB, USE_L2, EVEN_K)
    a3 = _prep_block(q_h, k_h, f_h, Qg_h, Go_h, rq_h, rk_h, tk2, m2, s_q, s_k, s_f, sHK, cols, m_c, dtb, neg_a, a2,
                     scale, H, BC, USE_GATE, HAS_DTB, USE_L2, EVEN_K)
    glast = _prep_block(q_h, k_h, f_h, Qg_h, Go_h, rq_h, rk_h, tk3, m3, s_q, s_k, s_f, sHK, cols, m_c, dtb, neg_a,
                        a3, scale, H, BC, USE_GATE, HAS_DTB, USE_L2, EVEN_K)
    # rows past the end carry g = 0, so glast is G of the last valid row
    tl.store(gam + (gc * H + i_h) * K + cols, glast, mask=m_c)
    tl.debug_barrier()  # G of every row is visible to every warp of the program

    # ---- Aqk, Akk by 16x16 blocks (Akk to an fp32 scratch), one 16-row block at a time
    S_h = Akk_s + i_h * BT
    _row_block(q_h, k_h, Go_h, A_h, S_h, rq_h, rk_h, b_h, t0, 0, eos, s_q, s_k, s_b, sHK, sHA, scale,
               H, K, BK, BKC, BC, EVEN_K, USE_L2, USE_SIGMOID)
    _row_block(q_h, k_h, Go_h, A_h, S_h, rq_h, rk_h, b_h, t0, 1, eos, s_q, s_k, s_b, sHK, sHA, scale,
               H, K, BK, BKC, BC, EVEN_K, USE_L2, USE_SIGMOID)
    _row_block(q_h, k_h, Go_h, A_h, S_h, rq_h, rk_h, b_h, t0, 2, eos, s_q, s_k, s_b, sHK, sHA, scale,
               H, K, BK, BKC, BC, EVEN_K, USE_L2, USE_SIGMOID)
    _row_block(q_h, k_h, Go_h, A_h, S_h, rq_h, rk_h, b_h, t0, 3, eos, s_q, s_k, s_b, sHK, sHA, scale,
               H, K, BK, BKC, BC, EVEN_K, USE_L2, USE_SIGMOID)
    tl.debug_barrier()

    # ---- M = (I + Akk)^-1, block row by block row (fp32 products), stored in the compute dtype
    M_h = Mo + i_h * BT
    zd = tl.zeros([BC, BC], dtype=dt)
    M00 = _inv_unit_lower(_load_blk(S_h, tk0, m0, sHA, 0, BC), BC)
    _store_arow(M_h, tk0, m0, sHA, M00.to(dt), zd, zd, zd, BC)
    A10 = _load_blk(S_h, tk1, m1, sHA, 0, BC)
    M11 = _inv_unit_lower(_load_blk(S_h, tk1, m1, sHA, BC, BC), BC)
    M10 = -_mm(_mm(M11, A10), M00)
    _store_arow(M_h, tk1, m1, sHA, M10.to(dt), M11.to(dt), zd, zd, BC)
    A20 = _load_blk(S_h, tk2, m2, sHA, 0, BC)
    A21 = _load_blk(S_h, tk2, m2, sHA, BC, BC)
    M22 = _inv_unit_lower(_load_blk(S_h, tk2, m2, sHA, 2 * BC, BC), BC)
    M21 = -_mm(_mm(M22, A21), M11)
    M20 = -_mm(M22, _mm(A20, M00) + _mm(A21, M10))
    _store_arow(M_h, tk2, m2, sHA, M20.to(dt), M21.to(dt), M22.to(dt), zd, BC)
    A30 = _load_blk(S_h, tk3, m3, sHA, 0, BC)
    A31 = _load_blk(S_h, tk3, m3, sHA, BC, BC)
    A32 = _load_blk(S_h, tk3, m3, sHA, 2 * BC, BC)
    M33 = _inv_unit_lower(_load_blk(S_h, tk3, m3, sHA, 3 * BC, BC), BC)
    M32 = -_mm(_mm(M33, A32), M22)
    M31 = -_mm(M33, _mm(A31, M11) + _mm(A32, M21))
    M30 = -_mm(M33, _mm(A30, M00) + _mm(A31, M10) + _mm(A32, M20))
    _store_arow(M_h, tk3, m3, sHA, M30.to(dt), M31.to(dt), M32.to(dt), M33.to(dt), BC)
    tl.debug_barrier()

    # ---- W = M (beta exp(G) k), Kd = k exp(G_last - G), U = M (beta v), by slices of 32 columns
    _wk_slices(k_h, Go_h, M_h, Wt + i_h * K, Kd + i_h * K, rq_h, rk_h, b_h, gam + (gc * H + i_h) * K, t0, eos,
               s_k, s_b, sHK, sHA, H, K, BK, BKC, BC, dt, EVEN_K, USE_L2, USE_SIGMOID)
    BVC: tl.constexpr = 32 if BV > 32 else BV
    _u_slices(v + i_h * V, M_h, U + i_h * V, b_h, t0, eos, s_v, s_b, H * V, sHA, V, BV, BVC, BC, dt,
              EVEN_V, USE_SIGMOID)


@triton.jit
def _mblk(M_h, tok, m_r, sHA, col0, dt: tl.constexpr, BC: tl.constexpr):
    o = tl.arange(0, BC)
    return tl.load(M_h + tok * sHA + col0 + o[:, None] * sHA + o[None, :], mask=m_r[:, None], other=0.0).to(dt)


@triton.jit
def _wk_slices(k_h, Go_h, M_h, W_h, Kd_h, rq_h, rk_h, b_h, gam_h, t0, eos, s_k, s_b, sHK, sHA,
               H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr, BC: tl.constexpr,
               dt: tl.constexpr, EVEN_K: tl.constexpr, USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr):
    o = tl.arange(0, BC)
    cs = tl.arange(0, BKC)
    tk1 = t0 + BC
    tk2 = t0 + 2 * BC
    tk3 = t0 + 3 * BC
    m0 = o < eos - t0
    m1 = o < eos - tk1
    m2 = o < eos - tk2
    m3 = o < eos - tk3
    _, rk0, b0 = _row_vecs(rq_h, rk_h, b_h, t0, m0, s_b, H, BC, USE_L2, USE_SIGMOID)
    _, rk1, b1 = _row_vecs(rq_h, rk_h, b_h, tk1, m1, s_b, H, BC, USE_L2, USE_SIGMOID)
    _, rk2, b2 = _row_vecs(rq_h, rk_h, b_h, tk2, m2, s_b, H, BC, USE_L2, USE_SIGMOID)
    _, rk3, b3 = _row_vecs(rq_h, rk_h, b_h, tk3, m3, s_b, H, BC, USE_L2, USE_SIGMOID)
    for kk in range(0, BK, BKC):
        m_s = kk + cs < K
        glast = load_vec(gam_h + kk, cs, m_s, True, EVEN_K)[None, :]
        kn0 = load_tile(k_h + t0 * s_k + kk, o, m0, s_k, cs, m_s, EVEN_K) * rk0[:, None]
        G0 = load_tile(Go_h + t0 * sHK + kk, o, m0, sHK, cs, m_s, EVEN_K)
        store_tile(Kd_h + t0 * sHK + kk, kn0 * tl.exp2(tl.minimum(glast - G0, 0.0)), o, m0, sHK, cs, m_s, EVEN_K)
        Y0 = (kn0 * b0[:, None] * tl.exp2(G0)).to(dt)
        kn1 = load_tile(k_h + tk1 * s_k + kk, o, m1, s_k, cs, m_s, EVEN_K) * rk1[:, None]
        G1 = load_tile(Go_h + tk1 * sHK + kk, o, m1, sHK, cs, m_s, EVEN_K)
        store_tile(Kd_h + tk1 * sHK + kk, kn1 * tl.exp2(tl.minimum(glast - G1, 0.0)), o, m1, sHK, cs, m_s, EVEN_K)
        Y1 = (kn1 * b1[:, None] * tl.exp2(G1)).to(dt)
        kn2 = load_tile(k_h + tk2 * s_k + kk, o, m2, s_k, cs, m_s, EVEN_K) * rk2[:, None]
        G2 = load_tile(Go_h + tk2 * sHK + kk, o, m2, sHK, cs, m_s, EVEN_K)
        store_tile(Kd_h + tk2 * sHK + kk, kn2 * tl.exp2(tl.minimum(glast - G2, 0.0)), o, m2, sHK, cs, m_s, EVEN_K)
        Y2 = (kn2 * b2[:, None] * tl.exp2(G2)).to(dt)
        kn3 = load_tile(k_h + tk3 * s_k + kk, o, m3, s_k, cs, m_s, EVEN_K) * rk3[:, None]
        G3 = load_tile(Go_h + tk3 * sHK + kk, o, m3, sHK, cs, m_s, EVEN_K)
        store_tile(Kd_h + tk3 * sHK + kk, kn3 * tl.exp2(tl.minimum(glast - G3, 0.0)), o, m3, sHK, cs, m_s, EVEN_K)
        Y3 = (kn3 * b3[:, None] * tl.exp2(G3)).to(dt)
        store_tile(W_h + t0 * sHK + kk, tl.dot(_mblk(M_h, t0, m0, sHA, 0, dt, BC), Y0), o, m0, sHK, cs, m_s, EVEN_K)
        w = tl.dot(_mblk(M_h, tk1, m1, sHA, 0, dt, BC), Y0)
        w = tl.dot(_mblk(M_h, tk1, m1, sHA, BC, dt, BC), Y1, w)
        store_tile(W_h + tk1 * sHK + kk, w, o, m1, sHK, cs, m_s, EVEN_K)
        w = tl.dot(_mblk(M_h, tk2, m2, sHA, 0, dt, BC), Y0)
        w = tl.dot(_mblk(M_h, tk2, m2, sHA, BC, dt, BC), Y1, w)
        w = tl.dot(_mblk(M_h, tk2, m2, sHA, 2 * BC, dt, BC), Y2, w)
        store_tile(W_h + tk2 * sHK + kk, w, o, m2, sHK, cs, m_s, EVEN_K)
        w = tl.dot(_mblk(M_h, tk3, m3, sHA, 0, dt, BC), Y0)
        w = tl.dot(_mblk(M_h, tk3, m3, sHA, BC, dt, BC), Y1, w)
        w = tl.dot(_mblk(M_h, tk3, m3, sHA, 2 * BC, dt, BC), Y2, w)
        w = tl.dot(_mblk(M_h, tk3, m3, sHA, 3 * BC, dt, BC), Y3, w)
        store_tile(W_h + tk3 * sHK + kk, w, o, m3, sHK, cs, m_s, EVEN_K)


@triton.jit
def _u_slices(v_h, M_h, U_h, b_h, t0, eos, s_v, s_b, sHV, sHA, V: tl.constexpr, BV: tl.constexpr,
              BVC: tl.constexpr, BC: tl.constexpr, dt: tl.constexpr, EVEN_V: tl.constexpr,
              USE_SIGMOID: tl.constexpr):
    o = tl.arange(0, BC)
    cs = tl.arange(0, BVC)
    tk1 = t0 + BC
    tk2 = t0 + 2 * BC
    tk3 = t0 + 3 * BC
    m0 = o < eos - t0
    m1 = o < eos - tk1
    m2 = o < eos - tk2
    m3 = o < eos - tk3
    b0 = load_beta(b_h + t0 * s_b, o, m0, s_b, USE_SIGMOID)[:, None]
    b1 = load_beta(b_h + tk1 * s_b, o, m1, s_b, USE_SIGMOID)[:, None]
    b2 = load_beta(b_h + tk2 * s_b, o, m2, s_b, USE_SIGMOID)[:, None]
    b3 = load_beta(b_h + tk3 * s_b, o, m3, s_b, USE_SIGMOID)[:, None]
    for vv in range(0, BV, BVC):
        m_s = vv + cs < V
        X0 = (load_tile(v_h + t0 * s_v + vv, o, m0, s_v, cs, m_s, EVEN_V) * b0).to(dt)
        X1 = (load_tile(v_h + tk1 * s_v + vv, o, m1, s_v, cs, m_s, EVEN_V) * b1).to(dt)
        X2 = (load_tile(v_h + tk2 * s_v + vv, o, m2, s_v, cs, m_s, EVEN_V) * b2).to(dt)
        X3 = (load_tile(v_h + tk3 * s_v + vv, o, m3, s_v, cs, m_s, EVEN_V) * b3).to(dt)
        store_tile(U_h + t0 * sHV + vv, tl.dot(_mblk(M_h, t0, m0, sHA, 0, dt, BC), X0), o, m0, sHV, cs, m_s, EVEN_V)
        u = tl.dot(_mblk(M_h, tk1, m1, sHA, 0, dt, BC), X0)
        u = tl.dot(_mblk(M_h, tk1, m1, sHA, BC, dt, BC), X1, u)
        store_tile(U_h + tk1 * sHV + vv, u, o, m1, sHV, cs, m_s, EVEN_V)
        u = tl.dot(_mblk(M_h, tk2, m2, sHA, 0, dt, BC), X0)
        u = tl.dot(_mblk(M_h, tk2, m2, sHA, BC, dt, BC), X1, u)
        u = tl.dot(_mblk(M_h, tk2, m2, sHA, 2 * BC, dt, BC), X2, u)
        store_tile(U_h + tk2 * sHV + vv, u, o, m2, sHV, cs, m_s, EVEN_V)
        u = tl.dot(_mblk(M_h, tk3, m3, sHA, 0, dt, BC), X0)
        u = tl.dot(_mblk(M_h, tk3, m3, sHA, BC, dt, BC), X1, u)
        u = tl.dot(_mblk(M_h, tk3, m3, sHA, 2 * BC, dt, BC), X2, u)
        u = tl.dot(_mblk(M_h, tk3, m3, sHA, 3 * BC, dt, BC), X3, u)
        store_tile(U_h + tk3 * sHV + vv, u, o, m3, sHV, cs, m_s, EVEN_V)


def chunk_fwd_intra_launch(q, k, v, f, beta, A_log, dt_bias, scale, idx, T, bufs, *, use_gate, use_l2,
                           use_sigmoid, save, num_warps=8, num_stages=1):
    """Launch the intra kernel. q, k, f: [*, H, K] token-major views; bufs: dict of output buffers."""
    H, K = q.shape[-2], q.shape[-1]
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    B = 1 if idx.chunk_seq is not None else idx.N
    grid = (idx.NT if idx.chunk_seq is not None else idx.NT_seq, B * H)
    chunk_kda_fwd_intra_kernel[grid](
        q, k, v, f, beta, A_log, dt_bias,
        bufs["W"], bufs["U"], bufs["Kd"], bufs["Qg"], bufs["Aqk"], bufs["gam"],
        bufs["M"], bufs["G"], bufs.get("rq"), bufs.get("rk"), bufs["Akk"],
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), v.stride(-3), f.stride(-3), beta.stride(-2),
        scale,
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, BC=16,
        IS_VARLEN=idx.chunk_seq is not None, USE_GATE=use_gate, HAS_DTB=dt_bias is not None,
        USE_L2=use_l2, USE_SIGMOID=use_sigmoid, SAVE=save,
        num_warps=num_warps, num_stages=num_stages,
    )
