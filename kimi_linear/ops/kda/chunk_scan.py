"""The sequential parts of chunkwise KDA: the inter-chunk state scan (forward, fused with the output)
and the reverse scan of the state gradient (backward).

One program per (sequence, head, V tile); the state tile S [K, BV] stays in fp32 registers while the
program walks the chunks of its sequence. Per chunk (spec section 4.2, W, U, Qg, Kd, Aqk from the
intra kernel, S the chunk-start state, gamma = exp2(G_last)):
    V' = U - W S;  O = Qg S + Aqk V';  S <- diag(gamma) S + Kd^T V'
Backward, dS the gradient of the state after the chunk:
    dV' = Aqk^T dO + Kd dS;  dS <- diag(gamma) dS + Qg^T dO - W^T dV'
S and dS enter the matmuls rounded to the compute dtype (bf16 for bf16 inputs), as V' does.
State pool: with `state_indices`, sequence n reads and writes slot state_indices[n] of the pool in
place; a negative index skips the sequence (its output rows are zeroed, no slot is touched).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_utils import dot_precision


@triton.jit
def _seq_bounds(n, T, NT_seq, cu_seqlens, chunk_offsets, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
        c_base = tl.load(chunk_offsets + n).to(tl.int64)
    else:
        bos = (n * T).to(tl.int64)
        eos = bos + T
        c_base = (n * NT_seq).to(tl.int64)
    return bos, eos, c_base


@triton.jit
def chunk_kda_fwd_scan_kernel(
    Wt, U, Kd, Qg, Aqk, gam, o, h0, ht, h_out, vn_out,
    cu_seqlens, chunk_offsets, state_indices,
    T, NT_seq, s_o,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    USE_POOL: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    n = i_nh // H
    i_h = i_nh % H
    bos, eos, c_base = _seq_bounds(n, T, NT_seq, cu_seqlens, chunk_offsets, IS_VARLEN)
    nc = tl.cdiv(eos - bos, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    ct = tl.arange(0, BT)
    m_k = ck < K
    m_v = cv < V
    m_kv = m_k[:, None] & m_v[None, :]
    dt = Wt.dtype.element_ty
    if USE_POOL:
        slot = tl.load(state_indices + n).to(tl.int64)
    else:
        slot = n.to(tl.int64)
    if USE_POOL:
        if slot < 0:
            # padding entry of the batch: zero its output rows, touch no state
            for c in range(nc):
                t0 = bos + c * BT
                p = o + t0 * s_o + i_h * V + ct[:, None] * s_o + cv[None, :]
                tl.store(p, tl.zeros([BT, BV], dtype=o.dtype.element_ty), mask=(ct < eos - t0)[:, None] & m_v[None, :])
            return
    o_s = ck[:, None] * V + cv[None, :]  # 32-bit offsets inside tiles, 64-bit scalar bases
    s_base = (slot * H + i_h) * K * V
    if HAS_H0:
        S = tl.load(h0 + s_base + o_s, mask=m_kv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    sHK = H * K
    sHV = H * V
    sHA = H * BT
    o_tk = ct[:, None] * sHK + ck[None, :]
    o_tv = ct[:, None] * sHV + cv[None, :]
    o_ta = ct[:, None] * sHA + ct[None, :]
    o_o = ct[:, None] * s_o + cv[None, :]
    for c in range(nc):
        t0 = bos + c * BT
        m_t = ct < eos - t0
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        tk = t0 * sHK + i_h * K
        w = tl.load(Wt + tk + o_tk, mask=m_tk, other=0.0)
        qg = tl.load(Qg + tk + o_tk, mask=m_tk, other=0.0)
        kd = tl.load(Kd + tk + o_tk, mask=m_tk, other=0.0)
        u = tl.load(U + t0 * sHV + i_h * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        A = tl.load(Aqk + t0 * sHA + i_h * BT + o_ta, mask=m_t[:, None], other=0.0)
        gc = c_base + c
        decay = tl.exp2(tl.load(gam + (gc * H + i_h) * K + ck, mask=m_k, other=0.0))
        Sb = S.to(dt)
        if SAVE:
            tl.store(h_out + (gc * H + i_h) * K * V + o_s, S.to(h_out.dtype.element_ty), mask=m_kv)
        vn = u - tl.dot(w, Sb, input_precision=PREC)
        vnb = vn.to(dt)
        if SAVE:
            tl.store(vn_out + t0 * sHV + i_h * V + o_tv, vnb, mask=m_tv)
        out = tl.dot(qg, Sb, input_precision=PREC) + tl.dot(A, vnb, input_precision=PREC)
        tl.store(o + t0 * s_o + i_h * V + o_o, out.to(o.dtype.element_ty), mask=m_tv)
        S = S * decay[:, None] + tl.dot(tl.trans(kd), vnb, input_precision=PREC)
    if STORE_FINAL:
        tl.store(ht + s_base + o_s, S.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_kda_bwd_scan_kernel(
    Aqk, do, Kd, Qg, Wt, gam, dht, dh_out, dvn_out, dh0,
    cu_seqlens, chunk_offsets,
    T, NT_seq, s_do,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    n = i_nh // H
    i_h = i_nh % H
    bos, eos, c_base = _seq_bounds(n, T, NT_seq, cu_seqlens, chunk_offsets, IS_VARLEN)
    nc = tl.cdiv(eos - bos, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    ct = tl.arange(0, BT)
    m_k = ck < K
    m_v = cv < V
    m_kv = m_k[:, None] & m_v[None, :]
    dt = Wt.dtype.element_ty
    o_s = ck[:, None] * V + cv[None, :]
    s_base = (n.to(tl.int64) * H + i_h) * K * V
    if HAS_DHT:
        dS = tl.load(dht + s_base + o_s, mask=m_kv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    sHK = H * K
    sHV = H * V
    sHA = H * BT
    o_tk = ct[:, None] * sHK + ck[None, :]
    o_tv = ct[:, None] * sHV + cv[None, :]
    o_ta = ct[:, None] * sHA + ct[None, :]
    o_do = ct[:, None] * s_do + cv[None, :]
    for i in range(nc):
        c = nc - 1 - i
        t0 = bos + c * BT
        m_t = ct < eos - t0
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        tk = t0 * sHK + i_h * K
        A = tl.load(Aqk + t0 * sHA + i_h * BT + o_ta, mask=m_t[:, None], other=0.0)
        g_o = tl.load(do + t0 * s_do + i_h * V + o_do, mask=m_tv, other=0.0).to(dt)
        kd = tl.load(Kd + tk + o_tk, mask=m_tk, other=0.0)
        qg = tl.load(Qg + tk + o_tk, mask=m_tk, other=0.0)
        w = tl.load(Wt + tk + o_tk, mask=m_tk, other=0.0)
        gc = c_base + c
        decay = tl.exp2(tl.load(gam + (gc * H + i_h) * K + ck, mask=m_k, other=0.0))
        dSb = dS.to(dt)
        tl.store(dh_out + (gc * H + i_h) * K * V + o_s, dS.to(dh_out.dtype.element_ty), mask=m_kv)
        dvn = tl.dot(tl.trans(A), g_o, input_precision=PREC) + tl.dot(kd, dSb, input_precision=PREC)
        dvnb = dvn.to(dt)
        tl.store(dvn_out + t0 * sHV + i_h * V + o_tv, dvnb, mask=m_tv)
        dS = (dS * decay[:, None] + tl.dot(tl.trans(qg), g_o, input_precision=PREC)
              - tl.dot(tl.trans(w), dvnb, input_precision=PREC))
    if HAS_DH0:
        tl.store(dh0 + s_base + o_s, dS, mask=m_kv)


def pick_scan(num_nh: int, V: int, backward: bool) -> tuple[int, int]:
    """(BV, num_stages) of a scan from the number of (sequence, head) pairs. Forward: BV=64 with 3
    stages (H100, H=32, K=V=128: 1.14 ms at 16x4096 vs 1.37 with 2 stages and 2.26 with BV=32; 1.76 ms
    at 1x65536 vs 2.43 with 2 stages). Backward: BV=32 (BV=64 spills registers)."""
    BVmax = max(16, triton.next_power_of_2(V))
    if backward:
        return min(32, BVmax), 2
    return min(64, BVmax), 3


def chunk_fwd_scan_launch(bufs, o, h0, ht, idx, T, state_indices, *, save, BV=None, num_warps=4,
                          num_stages=None):
    W = bufs["W"]
    H, K = W.shape[-2], W.shape[-1]
    V = o.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    bv, st = pick_scan(idx.N * H, V, backward=False)
    BV = BV or bv
    num_stages = num_stages or st
    grid = (triton.cdiv(V, BV), idx.N * H)
    chunk_kda_fwd_scan_kernel[grid](
        W, bufs["U"], bufs["Kd"], bufs["Qg"], bufs["Aqk"], bufs["gam"], o, h0, ht,
        bufs.get("h"), bufs.get("vn"),
        bufs.get("cu_seqlens"), idx.chunk_offsets, state_indices,
        T, idx.NT_seq, o.stride(-3),
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, IS_VARLEN=idx.chunk_offsets is not None,
        HAS_H0=h0 is not None, STORE_FINAL=ht is not None, USE_POOL=state_indices is not None, SAVE=save,
        PREC=dot_precision(W.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )


def chunk_bwd_scan_launch(bufs, do, dht, dh, dvn, dh0, idx, T, *, BV=None, num_warps=4, num_stages=None):
    W = bufs["W"]
    H, K = W.shape[-2], W.shape[-1]
    V = do.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    bv, st = pick_scan(idx.N * H, V, backward=True)
    BV = BV or bv
    num_stages = num_stages or st
    grid = (triton.cdiv(V, BV), idx.N * H)
    chunk_kda_bwd_scan_kernel[grid](
        bufs["Aqk"], do, bufs["Kd"], bufs["Qg"], W, bufs["gam"], dht, dh, dvn, dh0,
        bufs.get("cu_seqlens"), idx.chunk_offsets,
        T, idx.NT_seq, do.stride(-3),
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, IS_VARLEN=idx.chunk_offsets is not None,
        HAS_DHT=dht is not None, HAS_DH0=dh0 is not None, PREC=dot_precision(W.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
