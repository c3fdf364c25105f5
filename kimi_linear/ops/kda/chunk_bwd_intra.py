"""Backward of chunkwise KDA, part 2: per chunk, everything along the key dim, back to the inputs.

One program per (chunk, head), full K tiles, 16-row blocks J = 3..0 (reverse, so the reverse cumsum
of the decay gradient finishes block by block). Inputs: q, k, beta, the raw gate input (or the log
decay), the saved G (log2 units) and inverse norms, the per-chunk decay, and from part 1 dQg, dY,
dKd, dAqk, dAkk, dgx, dbx. With qh = scale q / |q|, kn = k / |k| and E[r, c] = exp(G_r - G_c):
    Aqk = (qh kn^T) o E (lower),  Akk = diag(beta) (kn kn^T) o E (strictly lower)
    row part  R[r] = sum_c dA[r, c] kn_c E[r, c];   column part  C[c] = sum_r dA[r, c] z_r E[r, c]
computed like the forward (anchored matmuls off the diagonal, exact 16x16 diagonal blocks). Then
    dqh = Rqk + dQg exp(G);  dkn = beta Rkk + Cqk + Ckk + beta exp(G) dY + dKd exp(G_last - G)
    dG  = qh dqh + kn (beta Rkk - Cqk - Ckk) + dY Y - dKd Kd;   dG_last = dgx + sum_r dKd Kd
    dbeta = rowsum(kn Rkk) + rowsum(dY exp(G) kn) + dbx;   dg = reverse cumsum(dG) + dG_last
followed by the L2-norm, beta-sigmoid and gate backward (dA_log and dt_bias as per-chunk partials).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import (chunk_of_program, load_beta, load_rows, sigmoid_thr, softplus,
                                             store_rows)


@triton.jit
def _load_block(q, k, rq, rk, Gs, rows, m_r, s_q, s_k, i_h, cols, m_c, scale,
                H: tl.constexpr, K: tl.constexpr, USE_L2: tl.constexpr):
    """(q / |q|, scale q / |q|, k / |k|, G) of one row block, zero on masked rows."""
    bq = load_rows(q, rows, m_r, s_q, i_h * K, cols, m_c)
    bk = load_rows(k, rows, m_r, s_k, i_h * K, cols, m_c)
    if USE_L2:
        b_rq = tl.load(rq + rows * H + i_h, mask=m_r, other=0.0)
        b_rk = tl.load(rk + rows * H + i_h, mask=m_r, other=0.0)
        bq = bq * b_rq[:, None]
        bk = bk * b_rk[:, None]
    G = load_rows(Gs, rows, m_r, H * K, i_h * K, cols, m_c)
    return bq, bq * scale, bk, G


@triton.jit
def _anchor(Gs, row, ok, i_h, cols, m_c, H: tl.constexpr, K: tl.constexpr):
    return tl.load(Gs + row * (H * K) + i_h * K + cols, mask=m_c & ok, other=0.0)


@triton.jit
def chunk_kda_bwd_intra_kernel(
    q, k, f, beta, A_log, dt_bias, rq, rk, Gs, gam,
    dQg, dY, dKd, dAqk, dAkk, dgx, dbx,
    dq, dk, df, dbeta, dA_part, ddt_part,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_q, s_k, s_f, s_b, s_dq, s_dk, s_df, s_db, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr, USE_L2: tl.constexpr,
    USE_SIGMOID: tl.constexpr,
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
    t0 = bos + i_c * BT
    o = tl.arange(0, BC)
    cols = tl.arange(0, BK)
    m_c = cols < K
    sHK = H * K
    sHA = H * BT
    if USE_GATE:
        neg_a = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if HAS_DTB:
            dtb = tl.load(dt_bias + i_h * K + cols, mask=m_c, other=0.0).to(tl.float32)
        else:
            dtb = tl.zeros([BK], dtype=tl.float32)
    glast = tl.load(gam + (gc * H + i_h) * K + cols, mask=m_c, other=0.0)

    # ---- gradient of the chunk decay G_last: through the state (part 1) and through Kd
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for J in range(BT // BC):
        rows = t0 + J * BC + o
        m_r = rows < eos
        bqn, bqh, bkn, bG = _load_block(q, k, rq, rk, Gs, rows, m_r, s_q, s_k, i_h, cols, m_c, scale,
                                        H, K, USE_L2)
        b_dKd = load_rows(dKd, rows, m_r, sHK, i_h * K, cols, m_c)
        acc += b_dKd * bkn * tl.exp2(tl.minimum(glast[None, :] - bG, 0.0))
    dglast = tl.load(dgx + (gc * H + i_h) * K + cols, mask=m_c, other=0.0) + tl.sum(acc, 0)

    carry = tl.zeros([BK], dtype=tl.float32)
    ddt = tl.zeros([BC, BK], dtype=tl.float32)  # reduced over rows once, at the end
    dA = tl.zeros([BC, BK], dtype=tl.float32)
    for jj in range(BT // BC):
        J = BT // BC - 1 - jj
        rows = t0 + J * BC + o
        m_r = rows < eos
        bqn, bqh, bkn, bG = _load_block(q, k, rq, rk, Gs, rows, m_r, s_q, s_k, i_h, cols, m_c, scale,
                                        H, K, USE_L2)
        b_b = load_beta(beta, rows, m_r, s_b, i_h, USE_SIGMOID)

        # -- row part from earlier blocks, through the anchor a = G just before this block
        a = _anchor(Gs, t0 + J * BC - 1, (J > 0) & (t0 + J * BC - 1 < eos), i_h, cols, m_c, H, K)
        Rqk = tl.zeros([BC, BK], dtype=tl.float32)
        Rkk = tl.zeros([BC, BK], dtype=tl.float32)
        for L in range(J):
            rows_l = t0 + L * BC + o
            m_l = rows_l < eos
            _, _, kn_l, G_l = _load_block(q, k, rq, rk, Gs, rows_l, m_l, s_q, s_k, i_h, cols, m_c, scale,
                                          H, K, USE_L2)
            kl = kn_l * tl.exp2(tl.minimum(a[None, :] - G_l, 0.0))
            p_a = rows[:, None] * sHA + i_h * BT + L * BC + o[None, :]
            dA_qk = tl.load(dAqk + p_a, mask=m_r[:, None], other=0.0)
            dA_kk = tl.load(dAkk + p_a, mask=m_r[:, None], other=0.0)
            Rqk += tl.dot(dA_qk, kl)
            Rkk += tl.dot(dA_kk, kl)
        eJ = tl.exp2(tl.minimum(bG - a[None, :], 0.0))
        Rqk = Rqk * eJ
        Rkk = Rkk * eJ

        # -- diagonal block, exact. Row part: loop over the columns c, column part: loop over the rows r;
        #    the single rows / columns are loads, the products are elementwise (no cross-warp reductions)
        row0 = t0 + J * BC
        Cd = tl.zeros([BC, BK], dtype=tl.float32)
        for c in range(BC):
            rc = row0 + c
            ok = rc < eos
            k_c = tl.load(k + rc * s_k + i_h * K + cols, mask=m_c & ok, other=0.0).to(tl.float32)
            if USE_L2:
                k_c = k_c * tl.load(rk + rc * H + i_h, mask=ok, other=0.0)
            G_c = tl.load(Gs + rc * sHK + i_h * K + cols, mask=m_c & ok, other=0.0)
            p_c = rows * sHA + i_h * BT + J * BC + c
            daq = tl.load(dAqk + p_c, mask=m_r, other=0.0)
            dak = tl.load(dAkk + p_c, mask=m_r, other=0.0)
            ek = tl.where(o[:, None] >= c, tl.exp2(tl.minimum(bG - G_c[None, :], 0.0)), 0.0) * k_c[None, :]
            Rqk += daq[:, None] * ek
            Rkk += dak[:, None] * ek
        for r in range(BC):
            rr = row0 + r
            ok = rr < eos
            q_r = tl.load(q + rr * s_q + i_h * K + cols, mask=m_c & ok, other=0.0).to(tl.float32) * scale
            k_r = tl.load(k + rr * s_k + i_h * K + cols, mask=m_c & ok, other=0.0).to(tl.float32)
            if USE_L2:
                q_r = q_r * tl.load(rq + rr * H + i_h, mask=ok, other=0.0)
                k_r = k_r * tl.load(rk + rr * H + i_h, mask=ok, other=0.0)
            b_r = tl.load(beta + rr * s_b + i_h, mask=ok, other=0.0).to(tl.float32)
            if USE_SIGMOID:
                b_r = tl.sigmoid(b_r)
            G_r = tl.load(Gs + rr * sHK + i_h * K + cols, mask=m_c & ok, other=0.0)
            p_r = rr * sHA + i_h * BT + J * BC + o
            daq = tl.load(dAqk + p_r, mask=ok & (o < BC), other=0.0)
            dak = tl.load(dAkk + p_r, mask=ok & (o < BC), other=0.0)
            e = tl.where(o[:, None] <= r, tl.exp2(tl.minimum(G_r[None, :] - bG, 0.0)), 0.0)
            Cd += (daq[:, None] * q_r[None, :] + dak[:, None] * (b_r * k_r)[None, :]) * e

        # -- column part from later blocks, through their anchors
        for I in range(J + 1, BT // BC):
            rows_i = t0 + I * BC + o
            m_i = rows_i < eos
            _, qh_i, kn_i, G_i = _load_block(q, k, rq, rk, Gs, rows_i, m_i, s_q, s_k, i_h, cols, m_c, scale,
                                             H, K, USE_L2)
            b_i = load_beta(beta, rows_i, m_i, s_b, i_h, USE_SIGMOID)
            a_i = _anchor(Gs, t0 + I * BC - 1, t0 + I * BC - 1 < eos, i_h, cols, m_c, H, K)
            e_i = tl.exp2(tl.minimum(G_i - a_i[None, :], 0.0))
            p_a = rows_i[:, None] * sHA + i_h * BT + J * BC + o[None, :]
            dA_qk = tl.load(dAqk + p_a, mask=m_i[:, None], other=0.0)
            dA_kk = tl.load(dAkk + p_a, mask=m_i[:, None], other=0.0)
            P = tl.dot(tl.trans(dA_qk), qh_i * e_i) + tl.dot(tl.trans(dA_kk), kn_i * b_i[:, None] * e_i)
            Cd += P * tl.exp2(tl.minimum(a_i[None, :] - bG, 0.0))

        # -- local terms, L2-norm / sigmoid backward
        eg = tl.exp2(bG)
        kdn = tl.exp2(tl.minimum(glast[None, :] - bG, 0.0))
        b_dQg = load_rows(dQg, rows, m_r, sHK, i_h * K, cols, m_c)
        b_dY = load_rows(dY, rows, m_r, sHK, i_h * K, cols, m_c)
        b_dKd = load_rows(dKd, rows, m_r, sHK, i_h * K, cols, m_c)
        dqh = Rqk + b_dQg * eg
        dqn = dqh * scale
        if USE_L2:
            b_rq = tl.load(rq + rows * H + i_h, mask=m_r, other=0.0)
            dqn = b_rq[:, None] * (dqn - bqn * tl.sum(bqn * dqn, 1)[:, None])
        store_rows(dq, dqn, rows, m_r, s_dq, i_h * K, cols, m_c)
        bRkk = b_b[:, None] * Rkk
        dYeg = b_dY * eg
        dKdk = b_dKd * kdn
        dkn = bRkk + Cd + b_b[:, None] * dYeg + dKdk
        if USE_L2:
            b_rk = tl.load(rk + rows * H + i_h, mask=m_r, other=0.0)
            dkn = b_rk[:, None] * (dkn - bkn * tl.sum(bkn * dkn, 1)[:, None])
        store_rows(dk, dkn, rows, m_r, s_dk, i_h * K, cols, m_c)
        dG = bqh * dqh + bkn * (bRkk - Cd + b_b[:, None] * dYeg - dKdk)
        db = tl.sum(bkn * (Rkk + dYeg), 1) + tl.load(dbx + rows * H + i_h, mask=m_r, other=0.0)
        if USE_SIGMOID:
            b_raw = tl.load(beta + rows * s_b + i_h, mask=m_r, other=0.0).to(tl.float32)
            s = tl.sigmoid(b_raw)
            db = db * s * (1.0 - s)
        tl.store(dbeta + rows * s_db + i_h, db.to(dbeta.dtype.element_ty), mask=m_r)

        # -- reverse cumsum of dG within the chunk, plus the chunk decay gradient
        dG = tl.where(m_r[:, None], dG, 0.0)
        tot = tl.sum(dG, 0)
        dg = tot[None, :] - tl.cumsum(dG, 0) + dG + (carry + dglast)[None, :]
        carry += tot
        if USE_GATE:
            x = load_rows(f, rows, m_r, s_f, i_h * K, cols, m_c)
            if HAS_DTB:
                x = x + dtb[None, :]
            m_rc = m_r[:, None] & m_c[None, :]
            dx = tl.where(m_rc, dg * neg_a * sigmoid_thr(x), 0.0)
            ddt += dx
            dA += tl.where(m_rc, dg * neg_a * softplus(x), 0.0)
            store_rows(df, dx, rows, m_r, s_df, i_h * K, cols, m_c)
        else:
            store_rows(df, dg, rows, m_r, s_df, i_h * K, cols, m_c)
    if USE_GATE:
        tl.store(dA_part + gc * H + i_h, tl.sum(tl.sum(dA, 0), 0))
        tl.store(ddt_part + (gc * H + i_h) * K + cols, tl.sum(ddt, 0), mask=m_c)


def chunk_bwd_intra_launch(q, k, f, beta, A_log, dt_bias, scale, bufs, grads, outs, idx, T, *, use_gate,
                           use_l2, use_sigmoid, num_warps=8, num_stages=1):
    H, K = q.shape[-2], q.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    B = 1 if idx.chunk_seq is not None else idx.N
    grid = (idx.NT if idx.chunk_seq is not None else idx.NT_seq, B * H)
    dq, dk, df, dbeta = outs["dq"], outs["dk"], outs["df"], outs["dbeta"]
    chunk_kda_bwd_intra_kernel[grid](
        q, k, f, beta, A_log, dt_bias, bufs.get("rq"), bufs.get("rk"), bufs["G"], bufs["gam"],
        grads["dQg"], grads["dY"], grads["dKd"], grads["dAqk"], grads["dAkk"], grads["dgx"], grads["dbx"],
        dq, dk, df, dbeta, outs.get("dA_part"), outs.get("ddt_part"),
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), f.stride(-3), beta.stride(-2),
        dq.stride(-3), dk.stride(-3), df.stride(-3), dbeta.stride(-2), scale,
        H=H, K=K, BK=BK, BT=64, BC=16, IS_VARLEN=idx.chunk_seq is not None, USE_GATE=use_gate,
        HAS_DTB=dt_bias is not None, USE_L2=use_l2, USE_SIGMOID=use_sigmoid,
        num_warps=num_warps, num_stages=num_stages,
    )
