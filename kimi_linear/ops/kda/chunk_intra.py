"""Forward intra-chunk KDA kernel: everything that is local to one 64-token chunk of one head.

One program per (chunk, head). It fuses, in fp32:
  gate g = -exp(A_log) softplus(f + dt_bias) (or a given log decay) and its chunk-local cumsum G,
  q/k L2 norm (eps 1e-6 inside the sqrt), q scale, beta sigmoid,
  Aqk[r, j] = sum_d qh_r k_j exp(G_r - G_j)  (j <= r) and Akk[r, j] = beta_r sum_d k_r k_j exp(G_r - G_j)
  (j < r), by 16x16 blocks: off-diagonal blocks through an anchor (the G just before the row block,
  so both exponent factors are <= 0) and a matmul; diagonal blocks exactly, column by column,
  M = (I + Akk)^-1 by 16x16 forward substitution merged with block-triangular formulas,
  W = M diag(beta) (exp(G) k), U = M diag(beta) v, Qg = qh exp(G), Kd = k exp(G_last - G).
Outputs go to token-indexed buffers [T_total, H, *] (rows past a sequence end are never written);
the decay of the whole chunk, G_last (log2 units), to a chunk-indexed buffer [NT, H, K].
With SAVE (training) it also writes what the backward needs: G (log2) [T_total, H, K] fp32, M, and
the inverse norms of q and k [T_total, H] fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import chunk_of_program, gate_log2, load_beta, load_rows, store_rows


@triton.jit
def _prep_block(q, k, f, beta, Qg, Go, rows, m_r, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb, neg_a, a, scale,
                H: tl.constexpr, K: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr,
                USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """Gate, chunk-local cumsum (from the prefix `a`), norms and beta of a row block; stores G and Qg.
    Returns (G of the last row = next prefix, 1/|q|, 1/|k|, beta)."""
    bq = load_rows(q, rows, m_r, s_q, i_h * K, cols, m_c)
    bk = load_rows(k, rows, m_r, s_k, i_h * K, cols, m_c)
    if USE_L2:
        rq = 1.0 / tl.sqrt(tl.sum(bq * bq, 1) + 1e-6)
        rk = 1.0 / tl.sqrt(tl.sum(bk * bk, 1) + 1e-6)
    else:
        rq = tl.full([bq.shape[0]], 1.0, tl.float32)
        rk = tl.full([bq.shape[0]], 1.0, tl.float32)
    g = gate_log2(f, rows, m_r, s_f, i_h, cols, m_c, dtb, neg_a, K, USE_GATE, HAS_DTB)
    G = a[None, :] + tl.cumsum(g, 0)
    store_rows(Go, G, rows, m_r, H * K, i_h * K, cols, m_c)
    store_rows(Qg, bq * (rq * scale)[:, None] * tl.exp2(G), rows, m_r, H * K, i_h * K, cols, m_c)
    b = load_beta(beta, rows, m_r, s_b, i_h, USE_SIGMOID)
    return a + tl.sum(g, 0), rq, rk, b


@triton.jit
def _kn_G(k, Go, rows, m_r, s_k, rk, i_h, cols, m_c, H: tl.constexpr, K: tl.constexpr):
    """Normalised k and G of a row block, reloaded (L1/L2) instead of kept in registers."""
    kn = load_rows(k, rows, m_r, s_k, i_h * K, cols, m_c) * rk[:, None]
    G = load_rows(Go, rows, m_r, H * K, i_h * K, cols, m_c)
    return kn, G


@triton.jit
def _a_blocks(q, k, Go, row0, rows, m_r, eos, s_q, s_k, i_h, cols, m_c, rq, rk, b, scale,
              H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """Diagonal blocks of Aqk (j <= r) and Akk (j < r), exact, column by column: the column's k and G
    rows are loads (no cross-warp reductions), the products reduce along K (inside a warp)."""
    o = tl.arange(0, BC)
    qh = load_rows(q, rows, m_r, s_q, i_h * K, cols, m_c) * (rq * scale)[:, None]
    kn, G = _kn_G(k, Go, rows, m_r, s_k, rk, i_h, cols, m_c, H, K)
    Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    Akk = tl.zeros([BC, BC], dtype=tl.float32)
    for c in range(BC):
        rc = row0 + c
        ok = m_c & (rc < eos)
        k_c = tl.load(k + rc * s_k + i_h * K + cols, mask=ok, other=0.0).to(tl.float32)
        G_c = tl.load(Go + rc * (H * K) + i_h * K + cols, mask=ok, other=0.0)
        t = tl.exp2(tl.minimum(G - G_c[None, :], 0.0)) * k_c[None, :]
        aq = tl.sum(qh * t, 1)
        ak = tl.sum(kn * t, 1)
        Aqk = tl.where(o[None, :] == c, aq[:, None], Aqk)
        Akk = tl.where(o[None, :] == c, ak[:, None], Akk)
    Aqk = tl.where(o[:, None] >= o[None, :], Aqk * rk[None, :], 0.0)
    Akk = tl.where(o[:, None] > o[None, :], Akk * b[:, None] * rk[None, :], 0.0)
    return qh, kn, G, Aqk, Akk


@triton.jit
def _off_block(qa, ka, b, k, Go, rows_j, m_j, s_k, rk_j, i_h, cols, m_c, a, H: tl.constexpr, K: tl.constexpr):
    """Off-diagonal blocks (row block after column block j) through the anchor `a` (G just before the
    row block): qa, ka are the row block's q / k times exp2(G - a) <= 1; column keys get exp2(a - G_j) <= 1."""
    kn_j, G_j = _kn_G(k, Go, rows_j, m_j, s_k, rk_j, i_h, cols, m_c, H, K)
    kj = kn_j * tl.exp2(tl.minimum(a[None, :] - G_j, 0.0))
    Aqk = tl.dot(qa, tl.trans(kj))
    Akk = tl.dot(ka, tl.trans(kj)) * b[:, None]
    return Aqk, Akk


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
def _store_block(ptr, x, rows, m_r, stride, col0, BC: tl.constexpr):
    o = tl.arange(0, BC)
    store_rows(ptr, x, rows, m_r, stride, col0, o, o < BC)


@triton.jit
def _store_arow(ptr, rows, m_r, stride, col0, x0, x1, x2, x3, BC: tl.constexpr):
    """One 16-row block of a [BT, BT] matrix, four 16x16 column blocks."""
    _store_block(ptr, x0, rows, m_r, stride, col0, BC)
    _store_block(ptr, x1, rows, m_r, stride, col0 + BC, BC)
    _store_block(ptr, x2, rows, m_r, stride, col0 + 2 * BC, BC)
    _store_block(ptr, x3, rows, m_r, stride, col0 + 3 * BC, BC)


@triton.jit
def _y_block(k, Go, rows, m_r, s_k, rk, b, i_h, cols, m_c, H: tl.constexpr, K: tl.constexpr, dt: tl.constexpr):
    kn, G = _kn_G(k, Go, rows, m_r, s_k, rk, i_h, cols, m_c, H, K)
    return (kn * b[:, None] * tl.exp2(G)).to(dt)


@triton.jit
def _kd_block(Kd, k, Go, rows, m_r, s_k, rk, glast, i_h, cols, m_c, H: tl.constexpr, K: tl.constexpr):
    kn, G = _kn_G(k, Go, rows, m_r, s_k, rk, i_h, cols, m_c, H, K)
    store_rows(Kd, kn * tl.exp2(tl.minimum(glast[None, :] - G, 0.0)), rows, m_r, H * K, i_h * K, cols, m_c)


@triton.jit
def chunk_kda_fwd_intra_kernel(
    q, k, v, f, beta, A_log, dt_bias,
    Wt, U, Kd, Qg, Aqk, gam, Mo, Go, rq_o, rk_o,
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
        gc = i_t
    else:
        gc = i_b * NT_seq + i_t
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
    sHA = H * BT
    dt = Wt.dtype.element_ty
    r0 = t0 + o
    m0 = r0 < eos
    r1 = r0 + BC
    m1 = r1 < eos
    r2 = r1 + BC
    m2 = r2 < eos
    r3 = r2 + BC
    m3 = r3 < eos

    # ---- gate, cumulative decay G (stored: later loads of single rows replace reductions), norms
    a0 = tl.zeros([BK], dtype=tl.float32)
    a1, rq0, rk0, b0 = _prep_block(q, k, f, beta, Qg, Go, r0, m0, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb, neg_a,
                                   a0, scale, H, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    a2, rq1, rk1, b1 = _prep_block(q, k, f, beta, Qg, Go, r1, m1, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb, neg_a,
                                   a1, scale, H, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    a3, rq2, rk2, b2 = _prep_block(q, k, f, beta, Qg, Go, r2, m2, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb, neg_a,
                                   a2, scale, H, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    glast, rq3, rk3, b3 = _prep_block(q, k, f, beta, Qg, Go, r3, m3, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb,
                                      neg_a, a3, scale, H, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    # rows past the end carry g = 0, so glast is G of the last valid row
    tl.store(gam + (gc * H + i_h).to(tl.int64) * K + cols, glast, mask=m_c)
    if SAVE:
        if USE_L2:
            tl.store(rq_o + r0 * H + i_h, rq0, mask=m0)
            tl.store(rq_o + r1 * H + i_h, rq1, mask=m1)
            tl.store(rq_o + r2 * H + i_h, rq2, mask=m2)
            tl.store(rq_o + r3 * H + i_h, rq3, mask=m3)
            tl.store(rk_o + r0 * H + i_h, rk0, mask=m0)
            tl.store(rk_o + r1 * H + i_h, rk1, mask=m1)
            tl.store(rk_o + r2 * H + i_h, rk2, mask=m2)
            tl.store(rk_o + r3 * H + i_h, rk3, mask=m3)
    tl.debug_barrier()  # G of every row is visible to every warp of the program

    # ---- Aqk, Akk by 16x16 blocks
    zb = tl.zeros([BC, BC], dtype=tl.float32)
    qh, kn, G, Aqk00, Akk00 = _a_blocks(q, k, Go, t0 + 0 * BC, r0, m0, eos, s_q, s_k, i_h, cols, m_c, rq0, rk0, b0, scale,
                                        H, K, BC)
    _store_arow(Aqk, r0, m0, sHA, i_h * BT, Aqk00, zb, zb, zb, BC)

    qh, kn, G, Aqk11, Akk11 = _a_blocks(q, k, Go, t0 + 1 * BC, r1, m1, eos, s_q, s_k, i_h, cols, m_c, rq1, rk1, b1, scale,
                                        H, K, BC)
    e = tl.exp2(tl.minimum(G - a1[None, :], 0.0))
    Aqk10, Akk10 = _off_block(qh * e, kn * e, b1, k, Go, r0, m0, s_k, rk0, i_h, cols, m_c, a1, H, K)
    _store_arow(Aqk, r1, m1, sHA, i_h * BT, Aqk10, Aqk11, zb, zb, BC)

    qh, kn, G, Aqk22, Akk22 = _a_blocks(q, k, Go, t0 + 2 * BC, r2, m2, eos, s_q, s_k, i_h, cols, m_c, rq2, rk2, b2, scale,
                                        H, K, BC)
    e = tl.exp2(tl.minimum(G - a2[None, :], 0.0))
    qa = qh * e
    ka = kn * e
    Aqk20, Akk20 = _off_block(qa, ka, b2, k, Go, r0, m0, s_k, rk0, i_h, cols, m_c, a2, H, K)
    Aqk21, Akk21 = _off_block(qa, ka, b2, k, Go, r1, m1, s_k, rk1, i_h, cols, m_c, a2, H, K)
    _store_arow(Aqk, r2, m2, sHA, i_h * BT, Aqk20, Aqk21, Aqk22, zb, BC)

    qh, kn, G, Aqk33, Akk33 = _a_blocks(q, k, Go, t0 + 3 * BC, r3, m3, eos, s_q, s_k, i_h, cols, m_c, rq3, rk3, b3, scale,
                                        H, K, BC)
    e = tl.exp2(tl.minimum(G - a3[None, :], 0.0))
    qa = qh * e
    ka = kn * e
    Aqk30, Akk30 = _off_block(qa, ka, b3, k, Go, r0, m0, s_k, rk0, i_h, cols, m_c, a3, H, K)
    Aqk31, Akk31 = _off_block(qa, ka, b3, k, Go, r1, m1, s_k, rk1, i_h, cols, m_c, a3, H, K)
    Aqk32, Akk32 = _off_block(qa, ka, b3, k, Go, r2, m2, s_k, rk2, i_h, cols, m_c, a3, H, K)
    _store_arow(Aqk, r3, m3, sHA, i_h * BT, Aqk30, Aqk31, Aqk32, Aqk33, BC)

    # ---- M = (I + Akk)^-1 by blocks (fp32 products)
    M00 = _inv_unit_lower(Akk00, BC)
    M11 = _inv_unit_lower(Akk11, BC)
    M22 = _inv_unit_lower(Akk22, BC)
    M33 = _inv_unit_lower(Akk33, BC)
    M10 = -_mm(_mm(M11, Akk10), M00)
    M21 = -_mm(_mm(M22, Akk21), M11)
    M20 = -_mm(M22, _mm(Akk20, M00) + _mm(Akk21, M10))
    M32 = -_mm(_mm(M33, Akk32), M22)
    M31 = -_mm(M33, _mm(Akk31, M11) + _mm(Akk32, M21))
    M30 = -_mm(M33, _mm(Akk30, M00) + _mm(Akk31, M10) + _mm(Akk32, M20))
    M00 = M00.to(dt)
    M10 = M10.to(dt)
    M11 = M11.to(dt)
    M20 = M20.to(dt)
    M21 = M21.to(dt)
    M22 = M22.to(dt)
    M30 = M30.to(dt)
    M31 = M31.to(dt)
    M32 = M32.to(dt)
    M33 = M33.to(dt)
    if SAVE:
        zd = zb.to(dt)
        _store_arow(Mo, r0, m0, sHA, i_h * BT, M00, zd, zd, zd, BC)
        _store_arow(Mo, r1, m1, sHA, i_h * BT, M10, M11, zd, zd, BC)
        _store_arow(Mo, r2, m2, sHA, i_h * BT, M20, M21, M22, zd, BC)
        _store_arow(Mo, r3, m3, sHA, i_h * BT, M30, M31, M32, M33, BC)

    # ---- W = M (beta exp(G) k), Kd = k exp(G_last - G)
    sHK = H * K
    Y0 = _y_block(k, Go, r0, m0, s_k, rk0, b0, i_h, cols, m_c, H, K, dt)
    Y1 = _y_block(k, Go, r1, m1, s_k, rk1, b1, i_h, cols, m_c, H, K, dt)
    Y2 = _y_block(k, Go, r2, m2, s_k, rk2, b2, i_h, cols, m_c, H, K, dt)
    Y3 = _y_block(k, Go, r3, m3, s_k, rk3, b3, i_h, cols, m_c, H, K, dt)
    store_rows(Wt, tl.dot(M00, Y0), r0, m0, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M10, Y0) + tl.dot(M11, Y1), r1, m1, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M20, Y0) + tl.dot(M21, Y1) + tl.dot(M22, Y2), r2, m2, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M30, Y0) + tl.dot(M31, Y1) + tl.dot(M32, Y2) + tl.dot(M33, Y3),
               r3, m3, sHK, i_h * K, cols, m_c)
    _kd_block(Kd, k, Go, r0, m0, s_k, rk0, glast, i_h, cols, m_c, H, K)
    _kd_block(Kd, k, Go, r1, m1, s_k, rk1, glast, i_h, cols, m_c, H, K)
    _kd_block(Kd, k, Go, r2, m2, s_k, rk2, glast, i_h, cols, m_c, H, K)
    _kd_block(Kd, k, Go, r3, m3, s_k, rk3, glast, i_h, cols, m_c, H, K)

    # ---- U = M (beta v)
    cv = tl.arange(0, BV)
    m_v = cv < V
    sHV = H * V
    X0 = (load_rows(v, r0, m0, s_v, i_h * V, cv, m_v) * b0[:, None]).to(dt)
    X1 = (load_rows(v, r1, m1, s_v, i_h * V, cv, m_v) * b1[:, None]).to(dt)
    X2 = (load_rows(v, r2, m2, s_v, i_h * V, cv, m_v) * b2[:, None]).to(dt)
    X3 = (load_rows(v, r3, m3, s_v, i_h * V, cv, m_v) * b3[:, None]).to(dt)
    store_rows(U, tl.dot(M00, X0), r0, m0, sHV, i_h * V, cv, m_v)
    store_rows(U, tl.dot(M10, X0) + tl.dot(M11, X1), r1, m1, sHV, i_h * V, cv, m_v)
    store_rows(U, tl.dot(M20, X0) + tl.dot(M21, X1) + tl.dot(M22, X2), r2, m2, sHV, i_h * V, cv, m_v)
    store_rows(U, tl.dot(M30, X0) + tl.dot(M31, X1) + tl.dot(M32, X2) + tl.dot(M33, X3),
               r3, m3, sHV, i_h * V, cv, m_v)


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
        bufs.get("M"), bufs["G"], bufs.get("rq"), bufs.get("rk"),
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), v.stride(-3), f.stride(-3), beta.stride(-2),
        scale,
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, BC=16,
        IS_VARLEN=idx.chunk_seq is not None, USE_GATE=use_gate, HAS_DTB=dt_bias is not None,
        USE_L2=use_l2, USE_SIGMOID=use_sigmoid, SAVE=save,
        num_warps=num_warps, num_stages=num_stages,
    )
