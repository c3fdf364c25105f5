"""Backward of chunkwise KDA, part 1: per chunk, the gradients that contract over the value dim.

One program per (chunk, head), full K and V tiles. Inputs: the chunk-start state S (h), the gradient
dS' of the state after the chunk (dh), V' and dV' (from the scans), dO, M = (I + Akk)^-1, U, W, v,
beta. Outputs (fp32 unless noted):
    dQg = dO S^T            [BT, K]   (gradient of Qg = qh exp(G))
    dKd = V' dS'^T          [BT, K]   (gradient of Kd = k exp(G_last - G))
    dgx = exp(G_last) * rowsum(S * dS')   [K]  (gradient of G_last through the state decay)
    dW  = -dV' S^T;  dY = M^T dW        [BT, K]   (Y = beta exp(G) k, W = M Y)
    dX  = M^T dV';  dv = beta dX (v dtype);  dbx = rowsum(dX * v)   (X = beta v, U = M X)
    dAqk = dO V'^T (lower, diagonal included)      [BT, BT]
    dAkk = -(dX U^T + dY W^T) (strictly lower)      [BT, BT]
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import chunk_of_program, dot_precision, load_beta


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_bwd_state_kernel(
    h, dh, vn, dvn, do, Mi, U, Wt, v, beta, gam,
    dv, dQg, dY, dKd, dAqk, dAkk, dgx, dbx,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_do, s_v, s_b, s_dv,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_SIGMOID: tl.constexpr, PREC: tl.constexpr,
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
    ct = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    m_t = ct < eos - t0
    m_k = ck < K
    m_v = cv < V
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    dt = Wt.dtype.element_ty
    sHK = H * K
    sHV = H * V
    sHA = H * BT
    # scalar 64-bit bases, 32-bit offsets inside the tiles
    o_s = ck[:, None] * V + cv[None, :]
    o_tk = ct[:, None] * sHK + ck[None, :]
    o_tv = ct[:, None] * sHV + cv[None, :]
    o_ta = ct[:, None] * sHA + ct[None, :]
    s_base = (gc * H + i_h) * K * V
    tk_base = t0 * sHK + i_h * K
    tv_base = t0 * sHV + i_h * V
    ta_base = t0 * sHA + i_h * BT

    S32 = tl.load(h + s_base + o_s, mask=m_kv, other=0.0).to(tl.float32)
    dS32 = tl.load(dh + s_base + o_s, mask=m_kv, other=0.0).to(tl.float32)
    S = S32.to(dt)
    dS = dS32.to(dt)
    g_o = tl.load(do + t0 * s_do + i_h * V + ct[:, None] * s_do + cv[None, :], mask=m_tv, other=0.0).to(dt)
    b_vn = tl.load(vn + tv_base + o_tv, mask=m_tv, other=0.0)
    b_dvn = tl.load(dvn + tv_base + o_tv, mask=m_tv, other=0.0)

    tl.store(dQg + tk_base + o_tk, tl.dot(g_o, tl.trans(S), input_precision=PREC), mask=m_tk)
    tl.store(dKd + tk_base + o_tk, tl.dot(b_vn, tl.trans(dS), input_precision=PREC), mask=m_tk)
    glast = tl.load(gam + (gc * H + i_h) * K + ck, mask=m_k, other=0.0)
    tl.store(dgx + (gc * H + i_h) * K + ck, tl.exp2(glast) * tl.sum(S32 * dS32, 1), mask=m_k)

    Mt = tl.trans(tl.load(Mi + ta_base + o_ta, mask=m_t[:, None], other=0.0))
    b_dY = tl.dot(Mt, (-tl.dot(b_dvn, tl.trans(S))).to(dt), input_precision=PREC)
    tl.store(dY + tk_base + o_tk, b_dY, mask=m_tk)
    b_dX = tl.dot(Mt, b_dvn, input_precision=PREC)
    b = load_beta(beta + i_h + t0 * s_b, ct, m_t, s_b, USE_SIGMOID)
    b_v = tl.load(v + t0 * s_v + i_h * V + ct[:, None] * s_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)
    tl.store(dv + t0 * s_dv + i_h * V + ct[:, None] * s_dv + cv[None, :], (b_dX * b[:, None]).to(dv.dtype.element_ty),
             mask=m_tv)
    tl.store(dbx + (t0 + ct) * H + i_h, tl.sum(b_dX * b_v, 1), mask=m_t)

    b_dA = tl.dot(g_o, tl.trans(b_vn), input_precision=PREC)
    tl.store(dAqk + ta_base + o_ta, tl.where(ct[:, None] >= ct[None, :], b_dA, 0.0), mask=m_t[:, None])
    b_u = tl.load(U + tv_base + o_tv, mask=m_tv, other=0.0)
    b_w = tl.load(Wt + tk_base + o_tk, mask=m_tk, other=0.0)
    b_dAkk = -(tl.dot(b_dX.to(dt), tl.trans(b_u), input_precision=PREC)
               + tl.dot(b_dY.to(dt), tl.trans(b_w), input_precision=PREC))
    tl.store(dAkk + ta_base + o_ta, tl.where(ct[:, None] > ct[None, :], b_dAkk, 0.0), mask=m_t[:, None])


def chunk_bwd_state_launch(bufs, do, v, beta, dv, grads, idx, T, *, use_sigmoid, num_warps=8, num_stages=1):
    W = bufs["W"]
    H, K = W.shape[-2], W.shape[-1]
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    B = 1 if idx.chunk_seq is not None else idx.N
    grid = (idx.NT if idx.chunk_seq is not None else idx.NT_seq, B * H)
    chunk_kda_bwd_state_kernel[grid](
        bufs["h"], grads["dh"], bufs["vn"], grads["dvn"], do, bufs["M"], bufs["U"], W, v, beta, bufs["gam"],
        dv, grads["dQg"], grads["dY"], grads["dKd"], grads["dAqk"], grads["dAkk"], grads["dgx"], grads["dbx"],
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, do.stride(-3), v.stride(-3), beta.stride(-2), dv.stride(-3),
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, IS_VARLEN=idx.chunk_seq is not None, USE_SIGMOID=use_sigmoid,
        PREC=dot_precision(bufs["W"].dtype), num_warps=num_warps, num_stages=num_stages,
    )
