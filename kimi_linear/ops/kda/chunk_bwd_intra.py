"""Backward of chunkwise KDA, part 2: per chunk, everything along the key dim, back to the inputs.

One program per (chunk, head); 16-row blocks J = 3..0 (reverse, so the reverse cumsum of the decay
gradient finishes block by block), each in K slices of 32 columns; dQg / dY are overwritten in place
with the gradients of the normalised q / k until the L2-norm backward, which needs whole rows. Inputs: q, k, beta, the raw gate input (or the log
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

from kimi_linear.ops.kda.chunk_utils import (chunk_of_program, load_beta, load_tile, load_vec, sigmoid_thr,
                                             softplus, store_tile)


@triton.jit
def _load_block(q_h, k_h, rq_h, rk_h, G_h, tok, m_r, s_q, s_k, sHK, kk, cs, m_s, scale, H: tl.constexpr,
                BC: tl.constexpr, USE_L2: tl.constexpr, EVEN_K: tl.constexpr):
    """K slice kk of (q / |q|, scale q / |q|, k / |k|, G) of the row block at token `tok` (zero on masked rows)."""
    o = tl.arange(0, BC)
    bq = load_tile(q_h + tok * s_q + kk, o, m_r, s_q, cs, m_s, EVEN_K)
    bk = load_tile(k_h + tok * s_k + kk, o, m_r, s_k, cs, m_s, EVEN_K)
    if USE_L2:
        bq = bq * tl.load(rq_h + (tok + o) * H, mask=m_r, other=0.0)[:, None]
        bk = bk * tl.load(rk_h + (tok + o) * H, mask=m_r, other=0.0)[:, None]
    G = load_tile(G_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
    return bq, bq * scale, bk, G


@triton.jit
def _dA_blk(dA_h, tok, m_r, sHA, col0, BC: tl.constexpr):
    o = tl.arange(0, BC)
    return load_tile(dA_h + tok * sHA + col0, o, m_r, sHA, o, o < BC, True)


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
    """Everything works on 16-row blocks and K slices of 32 columns ([16, 32] tiles: few registers,
    reductions along K inside a warp). dQg and dY are overwritten in place with the gradients of the
    normalised q and k before the L2-norm backward; dgx carries the running reverse cumsum of dG."""
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
    BKC: tl.constexpr = 32 if BK > 32 else BK
    t0 = bos + i_c * BT
    o = tl.arange(0, BC)
    cs = tl.arange(0, BKC)
    sHK = H * K
    sHA = H * BT
    if USE_GATE:
        neg_a = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
    q_h = q + i_h * K
    k_h = k + i_h * K
    f_h = f + i_h * K
    b_h = beta + i_h
    rq_h = rq + i_h
    rk_h = rk + i_h
    G_h = Gs + i_h * K
    dQg_h = dQg + i_h * K
    dY_h = dY + i_h * K
    dKd_h = dKd + i_h * K
    dAq_h = dAqk + i_h * BT
    dAk_h = dAkk + i_h * BT
    gam_h = gam + (gc * H + i_h) * K
    car_h = dgx + (gc * H + i_h) * K  # holds dG_last, then the running reverse cumsum carry
    if USE_GATE:
        ddt_h = ddt_part + (gc * H + i_h) * K

    # ---- gradient of the chunk decay G_last: through the state (part 1, in dgx) plus through Kd
    for kk in range(0, BK, BKC):
        m_s = kk + cs < K
        glast = load_vec(gam_h + kk, cs, m_s, True, EVEN_K)
        acc = tl.zeros([BC, BKC], dtype=tl.float32)
        for J in range(BT // BC):
            tok = t0 + J * BC
            m_r = o < eos - tok
            bqn, bqh, bkn, bG = _load_block(q_h, k_h, rq_h, rk_h, G_h, tok, m_r, s_q, s_k, sHK, kk, cs, m_s, scale,
                                            H, BC, USE_L2, EVEN_K)
            b_dKd = load_tile(dKd_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            acc += b_dKd * bkn * tl.exp2(tl.minimum(glast[None, :] - bG, 0.0))
        tl.store(car_h + kk + cs, load_vec(car_h + kk, cs, m_s, True, EVEN_K) + tl.sum(acc, 0), mask=m_s)
    tl.debug_barrier()

    dA_acc = 0.0
    for jj in range(BT // BC):
        J = BT // BC - 1 - jj
        tok = t0 + J * BC
        m_r = o < eos - tok
        nc = tl.minimum(eos - tok, BC).to(tl.int32)
        b_b = load_beta(b_h + tok * s_b, o, m_r, s_b, USE_SIGMOID)
        sq = tl.zeros([BC], dtype=tl.float32)
        sk = tl.zeros([BC], dtype=tl.float32)
        db = tl.zeros([BC], dtype=tl.float32)
        for kk in range(0, BK, BKC):
            m_s = kk + cs < K
            bqn, bqh, bkn, bG = _load_block(q_h, k_h, rq_h, rk_h, G_h, tok, m_r, s_q, s_k, sHK, kk, cs, m_s, scale,
                                            H, BC, USE_L2, EVEN_K)
            # -- row part from earlier blocks, through the anchor a = G just before this block
            a = load_vec(G_h + (tok - 1) * sHK + kk, cs, m_s, (J > 0) & (tok - 1 < eos), EVEN_K)
            Rqk = tl.zeros([BC, BKC], dtype=tl.float32)
            Rkk = tl.zeros([BC, BKC], dtype=tl.float32)
            for L in range(J):
                tok_l = t0 + L * BC
                _, _, kn_l, G_l = _load_block(q_h, k_h, rq_h, rk_h, G_h, tok_l, o < eos - tok_l, s_q, s_k, sHK, kk,
                                              cs, m_s, scale, H, BC, USE_L2, EVEN_K)
                kl = kn_l * tl.exp2(tl.minimum(a[None, :] - G_l, 0.0))
                Rqk = tl.dot(_dA_blk(dAq_h, tok, m_r, sHA, L * BC, BC), kl, Rqk)
                Rkk = tl.dot(_dA_blk(dAk_h, tok, m_r, sHA, L * BC, BC), kl, Rkk)
            eJ = tl.exp2(tl.minimum(bG - a[None, :], 0.0))
            Rqk = Rqk * eJ
            Rkk = Rkk * eJ
            # -- diagonal block, exact: row part over the columns c, column part over the rows r (loads)
            Cd = tl.zeros([BC, BKC], dtype=tl.float32)
            for c in range(nc):
                rc = tok + c
                k_c = load_vec(k_h + rc * s_k + kk, cs, m_s, True, EVEN_K)
                if USE_L2:
                    k_c = k_c * tl.load(rk_h + rc * H)
                G_c = load_vec(G_h + rc * sHK + kk, cs, m_s, True, EVEN_K)
                daq = tl.load(dAq_h + (tok + o) * sHA + J * BC + c, mask=m_r, other=0.0)
                dak = tl.load(dAk_h + (tok + o) * sHA + J * BC + c, mask=m_r, other=0.0)
                ek = tl.where(o[:, None] >= c, tl.exp2(tl.minimum(bG - G_c[None, :], 0.0)), 0.0) * k_c[None, :]
                Rqk += daq[:, None] * ek
                Rkk += dak[:, None] * ek
            for r in range(nc):
                rr = tok + r
                q_r = load_vec(q_h + rr * s_q + kk, cs, m_s, True, EVEN_K) * scale
                k_r = load_vec(k_h + rr * s_k + kk, cs, m_s, True, EVEN_K)
                if USE_L2:
                    q_r = q_r * tl.load(rq_h + rr * H)
                    k_r = k_r * tl.load(rk_h + rr * H)
                b_r = tl.load(b_h + rr * s_b).to(tl.float32)
                if USE_SIGMOID:
                    b_r = tl.sigmoid(b_r)
                G_r = load_vec(G_h + rr * sHK + kk, cs, m_s, True, EVEN_K)
                daq = tl.load(dAq_h + rr * sHA + J * BC + o)
                dak = tl.load(dAk_h + rr * sHA + J * BC + o)
                e = tl.where(o[:, None] <= r, tl.exp2(tl.minimum(G_r[None, :] - bG, 0.0)), 0.0)
                Cd += (daq[:, None] * q_r[None, :] + dak[:, None] * (b_r * k_r)[None, :]) * e
            # -- column part from later blocks, through their anchors
            for I in range(J + 1, BT // BC):
                tok_i = t0 + I * BC
                m_i = o < eos - tok_i
                _, qh_i, kn_i, G_i = _load_block(q_h, k_h, rq_h, rk_h, G_h, tok_i, m_i, s_q, s_k, sHK, kk, cs, m_s,
                                                 scale, H, BC, USE_L2, EVEN_K)
                b_i = load_beta(b_h + tok_i * s_b, o, m_i, s_b, USE_SIGMOID)
                a_i = load_vec(G_h + (tok_i - 1) * sHK + kk, cs, m_s, tok_i - 1 < eos, EVEN_K)
                e_i = tl.exp2(tl.minimum(G_i - a_i[None, :], 0.0))
                P = tl.dot(tl.trans(_dA_blk(dAq_h, tok_i, m_i, sHA, J * BC, BC)), qh_i * e_i)
                P = tl.dot(tl.trans(_dA_blk(dAk_h, tok_i, m_i, sHA, J * BC, BC)), kn_i * b_i[:, None] * e_i, P)
                Cd += P * tl.exp2(tl.minimum(a_i[None, :] - bG, 0.0))
            # -- local terms
            glast = load_vec(gam_h + kk, cs, m_s, True, EVEN_K)
            eg = tl.exp2(bG)
            kdn = tl.exp2(tl.minimum(glast[None, :] - bG, 0.0))
            b_dQg = load_tile(dQg_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            b_dY = load_tile(dY_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            b_dKd = load_tile(dKd_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            dqh = Rqk + b_dQg * eg
            dqn = dqh * scale
            bRkk = b_b[:, None] * Rkk
            dYeg = b_dY * eg
            dKdk = b_dKd * kdn
            dkn = bRkk + Cd + b_b[:, None] * dYeg + dKdk
            sq += tl.sum(bqn * dqn, 1)
            sk += tl.sum(bkn * dkn, 1)
            db += tl.sum(bkn * (Rkk + dYeg), 1)
            store_tile(dQg_h + tok * sHK + kk, dqn, o, m_r, sHK, cs, m_s, EVEN_K)  # in place, fixed up below
            store_tile(dY_h + tok * sHK + kk, dkn, o, m_r, sHK, cs, m_s, EVEN_K)
            # -- reverse cumsum of dG over the chunk (carry: later blocks and dG_last), gate backward
            dG = tl.where(m_r[:, None], bqh * dqh + bkn * (bRkk - Cd + b_b[:, None] * dYeg - dKdk), 0.0)
            carry = load_vec(car_h + kk, cs, m_s, True, EVEN_K)
            tot = tl.sum(dG, 0)
            dg = tot[None, :] - tl.cumsum(dG, 0) + dG + carry[None, :]
            tl.store(car_h + kk + cs, carry + tot, mask=m_s)
            if USE_GATE:
                x = load_tile(f_h + tok * s_f + kk, o, m_r, s_f, cs, m_s, EVEN_K)
                if HAS_DTB:
                    x = x + load_vec(dt_bias + i_h * K + kk, cs, m_s, True, EVEN_K)[None, :]
                m_rc = m_r[:, None] & m_s[None, :]
                dx = tl.where(m_rc, dg * neg_a * sigmoid_thr(x), 0.0)
                tl.store(ddt_h + kk + cs, load_vec(ddt_h + kk, cs, m_s, True, EVEN_K) + tl.sum(dx, 0), mask=m_s)
                dA_acc += tl.sum(tl.sum(tl.where(m_rc, dg * neg_a * softplus(x), 0.0), 1), 0)
                store_tile(df + i_h * K + tok * s_df + kk, dx, o, m_r, s_df, cs, m_s, EVEN_K)
            else:
                store_tile(df + i_h * K + tok * s_df + kk, dg, o, m_r, s_df, cs, m_s, EVEN_K)
        tl.debug_barrier()
        # -- L2-norm backward (needs the full-row dots sq, sk), beta sigmoid backward
        for kk in range(0, BK, BKC):
            m_s = kk + cs < K
            bqn, bqh, bkn, bG = _load_block(q_h, k_h, rq_h, rk_h, G_h, tok, m_r, s_q, s_k, sHK, kk, cs, m_s, scale,
                                            H, BC, USE_L2, EVEN_K)
            dqn = load_tile(dQg_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            dkn = load_tile(dY_h + tok * sHK + kk, o, m_r, sHK, cs, m_s, EVEN_K)
            if USE_L2:
                dqn = tl.load(rq_h + (tok + o) * H, mask=m_r, other=0.0)[:, None] * (dqn - bqn * sq[:, None])
                dkn = tl.load(rk_h + (tok + o) * H, mask=m_r, other=0.0)[:, None] * (dkn - bkn * sk[:, None])
            store_tile(dq + i_h * K + tok * s_dq + kk, dqn, o, m_r, s_dq, cs, m_s, EVEN_K)
            store_tile(dk + i_h * K + tok * s_dk + kk, dkn, o, m_r, s_dk, cs, m_s, EVEN_K)
        db += tl.load(dbx + (tok + o) * H + i_h, mask=m_r, other=0.0)
        if USE_SIGMOID:
            s = tl.sigmoid(tl.load(b_h + (tok + o) * s_b, mask=m_r, other=0.0).to(tl.float32))
            db = db * s * (1.0 - s)
        tl.store(dbeta + i_h + (tok + o) * s_db, db.to(dbeta.dtype.element_ty), mask=m_r)
    if USE_GATE:
        tl.store(dA_part + gc * H + i_h, dA_acc)


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
