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
def _block_inputs(q, k, f, beta, rows, m_r, s_q, s_k, s_f, s_b, i_h, cols, m_c, dtb, neg_a, scale,
                  K: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr, USE_L2: tl.constexpr,
                  USE_SIGMOID: tl.constexpr):
    """Normalised scaled q, normalised k, per-token log2 decay, beta and the inverse norms of a row block."""
    bq = load_rows(q, rows, m_r, s_q, i_h * K, cols, m_c)
    bk = load_rows(k, rows, m_r, s_k, i_h * K, cols, m_c)
    if USE_L2:
        rq = 1.0 / tl.sqrt(tl.sum(bq * bq, 1) + 1e-6)
        rk = 1.0 / tl.sqrt(tl.sum(bk * bk, 1) + 1e-6)
    else:
        rq = tl.full([bq.shape[0]], 1.0, tl.float32)
        rk = tl.full([bq.shape[0]], 1.0, tl.float32)
    qh = bq * (rq * scale)[:, None]
    kn = bk * rk[:, None]
    g = gate_log2(f, rows, m_r, s_f, i_h, cols, m_c, dtb, neg_a, K, USE_GATE, HAS_DTB)
    b = load_beta(beta, rows, m_r, s_b, i_h, USE_SIGMOID)
    return qh, kn, g, b, rq, rk


@triton.jit
def _diag_blocks(qh, kn, G, b, BC: tl.constexpr):
    """Exact diagonal 16x16 blocks of Aqk (j <= r) and Akk (j < r, times beta_r)."""
    o = tl.arange(0, BC)
    Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    Akk = tl.zeros([BC, BC], dtype=tl.float32)
    for c in range(BC):
        sel = o[:, None] == c  # (inlined row extraction: nested jit calls are slow in the interpreter)
        k_c = tl.sum(tl.where(sel, kn, 0.0), 0)
        G_c = tl.sum(tl.where(sel, G, 0.0), 0)
        t = tl.exp2(tl.minimum(G - G_c[None, :], 0.0)) * k_c[None, :]
        aq = tl.sum(qh * t, 1)
        ak = tl.sum(kn * t, 1)
        Aqk = tl.where(o[None, :] == c, aq[:, None], Aqk)
        Akk = tl.where(o[None, :] == c, ak[:, None], Akk)
    Aqk = tl.where(o[:, None] >= o[None, :], Aqk, 0.0)
    Akk = tl.where(o[:, None] > o[None, :], Akk * b[:, None], 0.0)
    return Aqk, Akk


@triton.jit
def _off_block(qa, ka, b, kn_j, G_j, a):
    """Off-diagonal blocks (row block after column block) through the anchor `a`.

    qa, ka: the row block's q / k already multiplied by exp2(G - a) (<= 1);
    the column block's k is multiplied by exp2(a - G_j) (<= 1)."""
    kj = kn_j * tl.exp2(tl.minimum(a[None, :] - G_j, 0.0))
    Aqk = tl.dot(qa, tl.trans(kj))
    Akk = tl.dot(ka, tl.trans(kj)) * b[:, None]
    return Aqk, Akk


@triton.jit
def _inv_unit_lower(A, BC: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular [BC, BC] A, by forward substitution."""
    o = tl.arange(0, BC)
    X = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in range(1, BC):
        a = tl.sum(tl.where(o[:, None] == i, A, 0.0), 0)
        r = -tl.sum(a[:, None] * X, 0)
        X = tl.where(o[:, None] == i, X + r[None, :], X)
    return X


@triton.jit
def _store_block(ptr, x, rows, m_r, stride, col0, BC: tl.constexpr):
    o = tl.arange(0, BC)
    store_rows(ptr, x, rows, m_r, stride, col0, o, o < BC)


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
    sHK = H * K
    sHA = H * BT

    # ---- row blocks: inputs, cumulative decay, diagonal and off-diagonal blocks of Aqk / Akk
    r0 = t0 + o
    m0 = r0 < eos
    r1 = r0 + BC
    m1 = r1 < eos
    r2 = r1 + BC
    m2 = r2 < eos
    r3 = r2 + BC
    m3 = r3 < eos
    zero_blk = tl.zeros([BC, BC], dtype=tl.float32)

    qh0, kn0, g0, b0, rq0, rk0 = _block_inputs(q, k, f, beta, r0, m0, s_q, s_k, s_f, s_b, i_h, cols, m_c,
                                               dtb, neg_a, scale, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    a0 = tl.zeros([BK], dtype=tl.float32)
    G0 = tl.cumsum(g0, 0)
    a1 = a0 + tl.sum(g0, 0)
    Aqk00, Akk00 = _diag_blocks(qh0, kn0, G0, b0, BC)
    _store_block(Aqk, Aqk00, r0, m0, sHA, i_h * BT, BC)
    _store_block(Aqk, zero_blk, r0, m0, sHA, i_h * BT + BC, BC)
    _store_block(Aqk, zero_blk, r0, m0, sHA, i_h * BT + 2 * BC, BC)
    _store_block(Aqk, zero_blk, r0, m0, sHA, i_h * BT + 3 * BC, BC)
    store_rows(Qg, qh0 * tl.exp2(G0), r0, m0, sHK, i_h * K, cols, m_c)

    qh1, kn1, g1, b1, rq1, rk1 = _block_inputs(q, k, f, beta, r1, m1, s_q, s_k, s_f, s_b, i_h, cols, m_c,
                                               dtb, neg_a, scale, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    G1 = a1[None, :] + tl.cumsum(g1, 0)
    a2 = a1 + tl.sum(g1, 0)
    Aqk11, Akk11 = _diag_blocks(qh1, kn1, G1, b1, BC)
    e1 = tl.exp2(tl.minimum(G1 - a1[None, :], 0.0))
    Aqk10, Akk10 = _off_block(qh1 * e1, kn1 * e1, b1, kn0, G0, a1)
    _store_block(Aqk, Aqk10, r1, m1, sHA, i_h * BT, BC)
    _store_block(Aqk, Aqk11, r1, m1, sHA, i_h * BT + BC, BC)
    _store_block(Aqk, zero_blk, r1, m1, sHA, i_h * BT + 2 * BC, BC)
    _store_block(Aqk, zero_blk, r1, m1, sHA, i_h * BT + 3 * BC, BC)
    store_rows(Qg, qh1 * tl.exp2(G1), r1, m1, sHK, i_h * K, cols, m_c)

    qh2, kn2, g2, b2, rq2, rk2 = _block_inputs(q, k, f, beta, r2, m2, s_q, s_k, s_f, s_b, i_h, cols, m_c,
                                               dtb, neg_a, scale, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    G2 = a2[None, :] + tl.cumsum(g2, 0)
    a3 = a2 + tl.sum(g2, 0)
    Aqk22, Akk22 = _diag_blocks(qh2, kn2, G2, b2, BC)
    e2 = tl.exp2(tl.minimum(G2 - a2[None, :], 0.0))
    qa = qh2 * e2
    ka = kn2 * e2
    Aqk20, Akk20 = _off_block(qa, ka, b2, kn0, G0, a2)
    Aqk21, Akk21 = _off_block(qa, ka, b2, kn1, G1, a2)
    _store_block(Aqk, Aqk20, r2, m2, sHA, i_h * BT, BC)
    _store_block(Aqk, Aqk21, r2, m2, sHA, i_h * BT + BC, BC)
    _store_block(Aqk, Aqk22, r2, m2, sHA, i_h * BT + 2 * BC, BC)
    _store_block(Aqk, zero_blk, r2, m2, sHA, i_h * BT + 3 * BC, BC)
    store_rows(Qg, qh2 * tl.exp2(G2), r2, m2, sHK, i_h * K, cols, m_c)

    qh3, kn3, g3, b3, rq3, rk3 = _block_inputs(q, k, f, beta, r3, m3, s_q, s_k, s_f, s_b, i_h, cols, m_c,
                                               dtb, neg_a, scale, K, USE_GATE, HAS_DTB, USE_L2, USE_SIGMOID)
    G3 = a3[None, :] + tl.cumsum(g3, 0)
    glast = a3 + tl.sum(g3, 0)
    Aqk33, Akk33 = _diag_blocks(qh3, kn3, G3, b3, BC)
    e3 = tl.exp2(tl.minimum(G3 - a3[None, :], 0.0))
    qa = qh3 * e3
    ka = kn3 * e3
    Aqk30, Akk30 = _off_block(qa, ka, b3, kn0, G0, a3)
    Aqk31, Akk31 = _off_block(qa, ka, b3, kn1, G1, a3)
    Aqk32, Akk32 = _off_block(qa, ka, b3, kn2, G2, a3)
    _store_block(Aqk, Aqk30, r3, m3, sHA, i_h * BT, BC)
    _store_block(Aqk, Aqk31, r3, m3, sHA, i_h * BT + BC, BC)
    _store_block(Aqk, Aqk32, r3, m3, sHA, i_h * BT + 2 * BC, BC)
    _store_block(Aqk, Aqk33, r3, m3, sHA, i_h * BT + 3 * BC, BC)
    store_rows(Qg, qh3 * tl.exp2(G3), r3, m3, sHK, i_h * K, cols, m_c)

    # per-chunk decay (log2); rows past the end carry g = 0, so this is G of the last valid row
    tl.store(gam + (gc * H + i_h).to(tl.int64) * K + cols, glast, mask=m_c)

    if SAVE:
        store_rows(Go, G0, r0, m0, sHK, i_h * K, cols, m_c)
        store_rows(Go, G1, r1, m1, sHK, i_h * K, cols, m_c)
        store_rows(Go, G2, r2, m2, sHK, i_h * K, cols, m_c)
        store_rows(Go, G3, r3, m3, sHK, i_h * K, cols, m_c)
        if USE_L2:
            tl.store(rq_o + r0 * H + i_h, rq0, mask=m0)
            tl.store(rq_o + r1 * H + i_h, rq1, mask=m1)
            tl.store(rq_o + r2 * H + i_h, rq2, mask=m2)
            tl.store(rq_o + r3 * H + i_h, rq3, mask=m3)
            tl.store(rk_o + r0 * H + i_h, rk0, mask=m0)
            tl.store(rk_o + r1 * H + i_h, rk1, mask=m1)
            tl.store(rk_o + r2 * H + i_h, rk2, mask=m2)
            tl.store(rk_o + r3 * H + i_h, rk3, mask=m3)

    # ---- M = (I + Akk)^-1 by blocks
    M00 = _inv_unit_lower(Akk00, BC)
    M11 = _inv_unit_lower(Akk11, BC)
    M22 = _inv_unit_lower(Akk22, BC)
    M33 = _inv_unit_lower(Akk33, BC)
    M10 = -tl.dot(tl.dot(M11, Akk10), M00)
    M21 = -tl.dot(tl.dot(M22, Akk21), M11)
    M20 = -tl.dot(M22, tl.dot(Akk20, M00) + tl.dot(Akk21, M10))
    M32 = -tl.dot(tl.dot(M33, Akk32), M22)
    M31 = -tl.dot(M33, tl.dot(Akk31, M11) + tl.dot(Akk32, M21))
    M30 = -tl.dot(M33, tl.dot(Akk30, M00) + tl.dot(Akk31, M10) + tl.dot(Akk32, M20))
    dt = Wt.dtype.element_ty
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
        zb = zero_blk.to(dt)
        _store_block(Mo, M00, r0, m0, sHA, i_h * BT, BC)
        _store_block(Mo, zb, r0, m0, sHA, i_h * BT + BC, BC)
        _store_block(Mo, zb, r0, m0, sHA, i_h * BT + 2 * BC, BC)
        _store_block(Mo, zb, r0, m0, sHA, i_h * BT + 3 * BC, BC)
        _store_block(Mo, M10, r1, m1, sHA, i_h * BT, BC)
        _store_block(Mo, M11, r1, m1, sHA, i_h * BT + BC, BC)
        _store_block(Mo, zb, r1, m1, sHA, i_h * BT + 2 * BC, BC)
        _store_block(Mo, zb, r1, m1, sHA, i_h * BT + 3 * BC, BC)
        _store_block(Mo, M20, r2, m2, sHA, i_h * BT, BC)
        _store_block(Mo, M21, r2, m2, sHA, i_h * BT + BC, BC)
        _store_block(Mo, M22, r2, m2, sHA, i_h * BT + 2 * BC, BC)
        _store_block(Mo, zb, r2, m2, sHA, i_h * BT + 3 * BC, BC)
        _store_block(Mo, M30, r3, m3, sHA, i_h * BT, BC)
        _store_block(Mo, M31, r3, m3, sHA, i_h * BT + BC, BC)
        _store_block(Mo, M32, r3, m3, sHA, i_h * BT + 2 * BC, BC)
        _store_block(Mo, M33, r3, m3, sHA, i_h * BT + 3 * BC, BC)

    # ---- W = M (beta exp(G) k), Kd = k exp(G_last - G)
    Y0 = (kn0 * b0[:, None] * tl.exp2(G0)).to(dt)
    Y1 = (kn1 * b1[:, None] * tl.exp2(G1)).to(dt)
    Y2 = (kn2 * b2[:, None] * tl.exp2(G2)).to(dt)
    Y3 = (kn3 * b3[:, None] * tl.exp2(G3)).to(dt)
    store_rows(Wt, tl.dot(M00, Y0), r0, m0, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M10, Y0) + tl.dot(M11, Y1), r1, m1, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M20, Y0) + tl.dot(M21, Y1) + tl.dot(M22, Y2), r2, m2, sHK, i_h * K, cols, m_c)
    store_rows(Wt, tl.dot(M30, Y0) + tl.dot(M31, Y1) + tl.dot(M32, Y2) + tl.dot(M33, Y3),
               r3, m3, sHK, i_h * K, cols, m_c)
    gl = glast[None, :]
    store_rows(Kd, kn0 * tl.exp2(tl.minimum(gl - G0, 0.0)), r0, m0, sHK, i_h * K, cols, m_c)
    store_rows(Kd, kn1 * tl.exp2(tl.minimum(gl - G1, 0.0)), r1, m1, sHK, i_h * K, cols, m_c)
    store_rows(Kd, kn2 * tl.exp2(tl.minimum(gl - G2, 0.0)), r2, m2, sHK, i_h * K, cols, m_c)
    store_rows(Kd, kn3 * tl.exp2(tl.minimum(gl - G3, 0.0)), r3, m3, sHK, i_h * K, cols, m_c)

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
        bufs.get("M"), bufs.get("G"), bufs.get("rq"), bufs.get("rk"),
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), v.stride(-3), f.stride(-3), beta.stride(-2),
        scale,
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, BC=16,
        IS_VARLEN=idx.chunk_seq is not None, USE_GATE=use_gate, HAS_DTB=dt_bias is not None,
        USE_L2=use_l2, USE_SIGMOID=use_sigmoid, SAVE=save,
        num_warps=num_warps, num_stages=num_stages,
    )
