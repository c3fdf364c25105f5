"""Backward of chunkwise KDA, part 2: everything along the key dim, back to q, k, g / f, beta, A_log, dt_bias.

Two kernels, split like the forward:
- `chunk_kda_bwd_intra_kernel`, one program per (16-token sub-chunk I, chunk, head), full [16, BK]
  tiles: the gradients of the intra-chunk products Aqk / Akk for the rows of I, the local terms, the
  L2-norm and beta-sigmoid backward (dq, dk, dbeta written), and the per-row decay gradient dG
  (written over dKd, which only this program reads) with the partial sum of dKd Kd over I.
- `chunk_kda_bwd_gate_kernel`, one program per (chunk, head, 32 channels), [64, 32] tiles: dg = reverse cumsum
  over the chunk of dG plus dG_last, then the gate backward (df, per-chunk dA_log / dt_bias partials).

With qh = scale q / |q|, kn = k / |k| and E[r, c] = exp(G_r - G_c) (c <= r, G the chunk-local cumsum):
    Aqk = (qh kn^T) o E (lower),  Akk = diag(beta) (kn kn^T) o E (strictly lower)
    row part  R[r] = sum_c dA[r, c] kn_c E[r, c];   column part  C[c] = sum_r dA[r, c] z_r E[r, c]
(z = qh for Aqk, beta kn for Akk). Every factored decay has an exponent <= 0, for gates of any size:
  columns of earlier sub-chunks J < I: anchor a = G of the first row of I, R = E(G_I - a) (dA (kn_J E(a - G_J)));
  rows of later sub-chunks: anchor b = G of the last row of I, C = E(b - G_I) (dA^T (z E(G - b)));
  the diagonal 16x16 block: its lower-left 8x8 block through the anchor G of its row 7 as above, its two
  8x8 diagonal blocks exactly (each pair's own exp2(min(G_r - G_c, 0)), one column per step).
Then, with dQg, dY, dKd, dAqk, dAkk, dgx, dbx from part 1 (`chunk_bwd_state`):
    dqh = Rqk + dQg exp(G);  dkn = beta Rkk + Cqk + Ckk + beta exp(G) dY + dKd exp(G_last - G)
    dG  = qh dqh + kn (beta Rkk - Cqk - Ckk + beta exp(G) dY - dKd exp(G_last - G))
    dG_last = dgx + sum_r dKd_r kn_r exp(G_last - G_r);   dbeta = rowsum(kn (Rkk + exp(G) dY)) + dbx
    dg = reverse cumsum(dG) + dG_last
The decays are exp2 of G in log2 units (as stored by the forward); the gradients are per natural-log unit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import chunk_of_program, dot_precision, load_beta, pair_rows, sigmoid_thr, softplus


@triton.jit
def _nrows(x_b, orow, m_r, stride, cols, m_c, r_b, H: tl.constexpr, USE_L2: tl.constexpr):
    """[R, BK] fp32 rows (row r at x_b + orow[r] * stride) times their stored inverse norm (fused norm)."""
    x = tl.load(x_b + orow[:, None] * stride + cols[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
    x = x.to(tl.float32)
    if USE_L2:
        x = x * tl.load(r_b + orow * H, mask=m_r, other=0.0)[:, None]
    return x


@triton.jit
def _grows(G_b, orow, m_r, sHK, cols, m_c):
    return tl.load(G_b + orow[:, None] * sHK + cols[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_bwd_intra_kernel(
    q, k, beta, rq, rk, Gs, gam,
    dQg, dY, dKd, dAqk, dAkk, dbx,
    dq, dk, dbeta, dgl,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_q, s_k, s_b, s_dq, s_dk, s_db, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr,
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
    if IS_VARLEN:
        gc = i_t.to(tl.int64)
    else:
        gc = (i_b * NT_seq + i_t).to(tl.int64)
    n_valid = tl.minimum(eos - tc, BT).to(tl.int32)
    sHK = H * K
    sHA = H * BT
    cols = tl.arange(0, BK)
    m_c = cols < K
    o = tl.arange(0, BC)
    rows = r0 + o
    m_r = rows < n_valid
    m_rc = m_r[:, None] & m_c[None, :]
    q_b = q + tc * s_q + i_h * K
    k_b = k + tc * s_k + i_h * K
    b_b = beta + tc * s_b + i_h
    G_b = Gs + tc * sHK + i_h * K
    rq_b = rq + tc * H + i_h
    rk_b = rk + tc * H + i_h
    dAq_b = dAqk + tc * sHA + i_h * BT
    dAk_b = dAkk + tc * sHA + i_h * BT

    kn = _nrows(k_b, rows, m_r, s_k, cols, m_c, rk_b, H, USE_L2)
    G = _grows(G_b, rows, m_r, sHK, cols, m_c)
    b = load_beta(b_b, rows, m_r, s_b, USE_SIGMOID)

    # ---- diagonal block, its two 8x8 diagonal blocks exactly: step c pairs rows 0..7 with column c and
    # rows 8..15 with column 8 + c (row part), columns 0..7 with row c and columns 8..15 with row 8 + c
    # (column part); dA is zero above its diagonal, so the pairs outside the triangle add nothing
    hi = o >= 8
    Rq = tl.zeros([BC, BK], dtype=tl.float32)
    Rk = tl.zeros([BC, BK], dtype=tl.float32)
    Cd = tl.zeros([BC, BK], dtype=tl.float32)
    for c in range(8):
        Gc = pair_rows(G_b, r0 + c, sHK, cols, m_c, hi, n_valid, rk_b, H, False)
        kc = pair_rows(k_b, r0 + c, s_k, cols, m_c, hi, n_valid, rk_b, H, USE_L2)
        rc = r0 + c + tl.where(hi, 8, 0)
        m_col = rc < n_valid
        t = tl.exp2(tl.minimum(G - Gc, 0.0)) * kc
        Rq += tl.load(dAq_b + rows * sHA + rc, mask=m_r, other=0.0)[:, None] * t
        Rk += tl.load(dAk_b + rows * sHA + rc, mask=m_r, other=0.0)[:, None] * t
        # the same step with rows and columns swapped: row rc of the sub-chunk against column o
        zq = pair_rows(q_b, r0 + c, s_q, cols, m_c, hi, n_valid, rq_b, H, USE_L2)
        tq = tl.load(dAq_b + rc * sHA + r0 + o, mask=m_col, other=0.0) * scale
        tk = tl.load(dAk_b + rc * sHA + r0 + o, mask=m_col, other=0.0) * load_beta(b_b, rc, m_col, s_b, USE_SIGMOID)
        Cd += (tq[:, None] * zq + tk[:, None] * kc) * tl.exp2(tl.minimum(Gc - G, 0.0))

    # ---- row part from the sub-chunks before I, anchor a = G of the first row of I
    if i_s > 0:
        Pq = tl.zeros([BC, BK], dtype=tl.float32)
        Pk = tl.zeros([BC, BK], dtype=tl.float32)
        a = tl.load(G_b + r0 * sHK + cols, mask=m_c, other=0.0)[None, :]
        for J in range(i_s):
            rj = J * BC + o
            m_j = rj < n_valid
            kj = _nrows(k_b, rj, m_j, s_k, cols, m_c, rk_b, H, USE_L2)
            kj = kj * tl.exp2(tl.minimum(a - _grows(G_b, rj, m_j, sHK, cols, m_c), 0.0))
            pj = rows[:, None] * sHA + J * BC + o[None, :]
            Pq = tl.dot(tl.load(dAq_b + pj, mask=m_r[:, None], other=0.0), kj, Pq, input_precision=PREC)
            Pk = tl.dot(tl.load(dAk_b + pj, mask=m_r[:, None], other=0.0), kj, Pk, input_precision=PREC)
        ea = tl.exp2(tl.minimum(G - a, 0.0))
        Rq += Pq * ea
        Rk += Pk * ea

    # ---- diagonal block, lower-left 8x8 (rows 8..15, columns 0..7) through the anchor G of row 7
    a7 = tl.load(G_b + (r0 + 7) * sHK + cols, mask=(r0 + 7 < n_valid) & m_c, other=0.0)[None, :]
    Ph = tl.where(hi[:, None], tl.exp2(tl.minimum(G - a7, 0.0)), 0.0)
    Ql = tl.where(hi[:, None], 0.0, tl.exp2(tl.minimum(a7 - G, 0.0)))
    pd = rows[:, None] * sHA + r0 + o[None, :]
    m_ll = m_r[:, None] & hi[:, None] & (o[None, :] < 8)
    dq_ll = tl.load(dAq_b + pd, mask=m_ll, other=0.0)
    dk_ll = tl.load(dAk_b + pd, mask=m_ll, other=0.0)
    kq = kn * Ql
    Rq += Ph * tl.dot(dq_ll, kq, input_precision=PREC)
    Rk += Ph * tl.dot(dk_ll, kq, input_precision=PREC)
    qn = _nrows(q_b, rows, m_r, s_q, cols, m_c, rq_b, H, USE_L2)
    qh = qn * scale
    Cd += Ql * (tl.dot(tl.trans(dq_ll), qh * Ph, input_precision=PREC)
                + tl.dot(tl.trans(dk_ll), (kn * b[:, None]) * Ph, input_precision=PREC))

    # ---- column part from the sub-chunks after I, anchor b = G of the last row of I
    n_sub = tl.cdiv(n_valid, BC)
    if i_s + 1 < n_sub:
        ab = tl.load(G_b + (r0 + BC - 1) * sHK + cols, mask=m_c, other=0.0)[None, :]
        C2 = tl.zeros([BC, BK], dtype=tl.float32)
        for I in range(i_s + 1, n_sub):
            ri = I * BC + o
            m_i = ri < n_valid
            e = tl.exp2(tl.minimum(_grows(G_b, ri, m_i, sHK, cols, m_c) - ab, 0.0))
            zq = _nrows(q_b, ri, m_i, s_q, cols, m_c, rq_b, H, USE_L2) * (e * scale)
            zk = _nrows(k_b, ri, m_i, s_k, cols, m_c, rk_b, H, USE_L2) * (e * load_beta(b_b, ri, m_i, s_b,
                                                                                             USE_SIGMOID)[:, None])
            pi = ri[:, None] * sHA + r0 + o[None, :]
            C2 = tl.dot(tl.trans(tl.load(dAq_b + pi, mask=m_i[:, None], other=0.0)), zq, C2, input_precision=PREC)
            C2 = tl.dot(tl.trans(tl.load(dAk_b + pi, mask=m_i[:, None], other=0.0)), zk, C2, input_precision=PREC)
        Cd += C2 * tl.exp2(tl.minimum(ab - G, 0.0))

    # ---- local terms (Qg = qh exp(G), Y = beta exp(G) kn, Kd = kn exp(G_last - G)), then the norms
    glast = tl.load(gam + (gc * H + i_h) * K + cols, mask=m_c, other=0.0)[None, :]
    eg = tl.exp2(G)
    kdn = tl.exp2(tl.minimum(glast - G, 0.0))
    tok = (tc + rows)[:, None] * sHK + i_h * K + cols[None, :]
    dqh = Rq + tl.load(dQg + tok, mask=m_rc, other=0.0) * eg
    bRk = b[:, None] * Rk
    dYe = tl.load(dY + tok, mask=m_rc, other=0.0) * eg
    dKdk = tl.load(dKd + tok, mask=m_rc, other=0.0) * kdn
    dkn = bRk + Cd + b[:, None] * dYe + dKdk
    dG = tl.where(m_rc, qh * dqh + kn * (bRk - Cd + b[:, None] * dYe - dKdk), 0.0)
    tl.store(dKd + tok, dG, mask=m_rc)  # dKd is read by this program only: its rows now hold dG
    tl.store(dgl + ((gc * 4 + i_s) * H + i_h) * K + cols, tl.sum(tl.where(m_rc, kn * dKdk, 0.0), 0), mask=m_c)
    db = tl.sum(kn * (Rk + dYe), 1) + tl.load(dbx + (tc + rows) * H + i_h, mask=m_r, other=0.0)
    if USE_SIGMOID:
        sb = tl.sigmoid(tl.load(b_b + rows * s_b, mask=m_r, other=0.0).to(tl.float32))
        db = db * sb * (1.0 - sb)
    tl.store(dbeta + i_h + (tc + rows) * s_db, db.to(dbeta.dtype.element_ty), mask=m_r)
    dqn = dqh * scale
    if USE_L2:
        dqn = tl.load(rq_b + rows * H, mask=m_r, other=0.0)[:, None] * (dqn - qn * tl.sum(qn * dqn, 1)[:, None])
        dkn = tl.load(rk_b + rows * H, mask=m_r, other=0.0)[:, None] * (dkn - kn * tl.sum(kn * dkn, 1)[:, None])
    tl.store(dq + i_h * K + (tc + rows)[:, None] * s_dq + cols[None, :], dqn.to(dq.dtype.element_ty), mask=m_rc)
    tl.store(dk + i_h * K + (tc + rows)[:, None] * s_dk + cols[None, :], dkn.to(dk.dtype.element_ty), mask=m_rc)


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_bwd_gate_kernel(
    f, A_log, dt_bias, dG, dgx, dgl, df, dA_part, ddt_part,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_f, s_df,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr,
):
    """Channels i_k * BK .. i_k * BK + BK - 1 (BK here: the channel block); dA_part gets one partial per block."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_k = tl.program_id(2)
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
    t0 = bos + i_c * BT
    n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
    ot = tl.arange(0, BT)
    m_t = ot < n_valid
    cols = i_k * BK + tl.arange(0, BK)
    m_c = cols < K
    m_tc = m_t[:, None] & m_c[None, :]
    sHK = H * K
    os4 = tl.arange(0, 4)
    part = tl.load(dgl + ((gc * 4 + os4[:, None]) * H + i_h) * K + cols[None, :],
                   mask=(os4 * BC < n_valid)[:, None] & m_c[None, :], other=0.0)
    glast = tl.load(dgx + (gc * H + i_h) * K + cols, mask=m_c, other=0.0) + tl.sum(part, 0)
    dGt = tl.load(dG + (t0 + ot)[:, None] * sHK + i_h * K + cols[None, :], mask=m_tc, other=0.0)
    dg = tl.where(m_tc, (tl.sum(dGt, 0)[None, :] - tl.cumsum(dGt, 0) + dGt) + glast[None, :], 0.0)
    p_f = (t0 + ot)[:, None] * s_f + i_h * K + cols[None, :]
    p_df = (t0 + ot)[:, None] * s_df + i_h * K + cols[None, :]
    if USE_GATE:
        neg_a = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
        x = tl.load(f + p_f, mask=m_tc, other=0.0).to(tl.float32)
        if HAS_DTB:
            x = x + tl.load(dt_bias + i_h * K + cols, mask=m_c, other=0.0).to(tl.float32)[None, :]
        dx = tl.where(m_tc, dg * neg_a * sigmoid_thr(x), 0.0)
        tl.store(df + p_df, dx.to(df.dtype.element_ty), mask=m_tc)
        tl.store(ddt_part + (gc * H + i_h) * K + cols, tl.sum(dx, 0), mask=m_c)
        tl.store(dA_part + (gc * H + i_h) * tl.num_programs(2) + i_k,
                 tl.sum(tl.sum(tl.where(m_tc, dg * neg_a * softplus(x), 0.0), 1), 0))
    else:
        tl.store(df + p_df, dg.to(df.dtype.element_ty), mask=m_tc)


def chunk_bwd_intra_launch(q, k, f, beta, A_log, dt_bias, scale, bufs, grads, outs, idx, T, *, use_gate,
                           use_l2, use_sigmoid, num_warps=4, num_stages=1, gate_warps=4):
    """dq, dk, dbeta, df (and the dA_log / dt_bias partials) into `outs`; grads["dKd"] ends holding dG."""
    H, K = q.shape[-2], q.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    B = 1 if idx.chunk_seq is not None else idx.N
    nt = idx.NT if idx.chunk_seq is not None else idx.NT_seq
    varlen = idx.chunk_seq is not None
    dq, dk, df, dbeta = outs["dq"], outs["dk"], outs["df"], outs["dbeta"]
    dgl = grads["dgl"]
    chunk_kda_bwd_intra_kernel[(4 * nt, B * H)](
        q, k, beta, bufs.get("rq"), bufs.get("rk"), bufs["G"], bufs["gam"],
        grads["dQg"], grads["dY"], grads["dKd"], grads["dAqk"], grads["dAkk"], grads["dbx"],
        dq, dk, dbeta, dgl,
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), beta.stride(-2),
        dq.stride(-3), dk.stride(-3), dbeta.stride(-2), scale,
        H=H, K=K, BK=BK, BT=64, BC=16, IS_VARLEN=varlen, USE_L2=use_l2, USE_SIGMOID=use_sigmoid,
        PREC=dot_precision(bufs["W"].dtype), num_warps=num_warps, num_stages=num_stages,
    )
    BKG = min(32, BK)
    chunk_kda_bwd_gate_kernel[(nt, B * H, triton.cdiv(K, BKG))](
        f, A_log, dt_bias, grads["dKd"], grads["dgx"], dgl, df, outs.get("dA_part"), outs.get("ddt_part"),
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, f.stride(-3), df.stride(-3),
        H=H, K=K, BK=BKG, BT=64, BC=16, IS_VARLEN=varlen, USE_GATE=use_gate, HAS_DTB=dt_bias is not None,
        num_warps=gate_warps, num_stages=1,
    )
