"""Forward intra-chunk KDA, around `chunk_diag`: the prep kernel before it and the solve kernel after.

Prep, one program per (chunk, head), [64, BK] tiles:
  gate g = -exp(A_log) softplus(f + dt_bias) (or a given log decay) and its chunk-local cumsum G
  (log2 units, stored: chunk_diag's products and the backward read it), q / k inverse L2 norms
  (stored), Qg = qh exp2(G), Kd = kh exp2(G_last - G), Y = beta kh exp2(G) (into the W buffer),
  G_last to the chunk-indexed decay buffer, zeros in the blocks of Aqk above the diagonal.
Then `chunk_diag` fills the lower blocks of Aqk and the fp32 Akk scratch.
Solve, one program per (chunk, head):
  M = (I + Akk)^-1: diagonal 16x16 blocks as (I - A)(I + A^2)(I + A^4)(I + A^8) (A^16 = 0), merged
  by block-triangular formulas (fp32 products), stored in the compute dtype; then W = M Y and
  U = M (beta v) as [64, 64] x [64, 64] matmuls by column slices.
qh = scale * q / |q|, kh = k / |k| (eps 1e-6 inside the sqrt) when the norm is fused.
Outputs go to token-indexed buffers [T_total, H, *] (rows past a sequence end are never written).
Three kernels instead of one: each stays small in registers, so several programs share an SM and
hide each other's latency (one fused kernel needed 255 registers and ran 2x slower).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.chunk_diag import SPAN, chunk_fwd_diag_launch
from kimi_linear.ops.kda.chunk_utils import chunk_of_program, dot_precision, gate_log2, load_beta, load_tile, store_tile


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


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_fwd_prep_kernel(
    q, k, f, beta, A_log, dt_bias,
    Wt, Kd, Qg, Aqk, gam, Go, rq_o, rk_o,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_q, s_k, s_f, s_b, scale,
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
    EVEN_K: tl.constexpr = K == BK
    t0 = bos + i_c * BT
    n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
    ot = tl.arange(0, BT)
    m_t = ot < n_valid
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
    q_b = q + t0 * s_q + i_h * K
    k_b = k + t0 * s_k + i_h * K
    f_b = f + t0 * s_f + i_h * K
    b_b = beta + t0 * s_b + i_h
    G_b = Go + t0 * sHK + i_h * K
    W_b = Wt + t0 * sHK + i_h * K
    A_b = Aqk + t0 * sHA + i_h * BT

    g = gate_log2(f_b, ot, m_t, s_f, cols, m_c, dtb, neg_a, USE_GATE, HAS_DTB, EVEN_K)
    G = tl.cumsum(g, 0)
    store_tile(G_b, G, ot, m_t, sHK, cols, m_c, EVEN_K)
    tl.debug_barrier()
    # G and G_last reloaded (L2): keeps the gate and the scan in one register layout (else the compiler
    # computes them twice, in two layouts)
    G = load_tile(G_b, ot, m_t, sHK, cols, m_c, EVEN_K)
    glast = tl.load(G_b + (n_valid - 1) * sHK + cols, mask=m_c, other=0.0)
    tl.store(gam + (gc * H + i_h) * K + cols, glast, mask=m_c)
    x = load_tile(q_b, ot, m_t, s_q, cols, m_c, EVEN_K)
    if USE_L2:
        r = 1.0 / tl.sqrt(tl.sum(x * x, 1) + 1e-6)
        tl.store(rq_o + (t0 + ot) * H + i_h, r, mask=m_t)
        x = x * r[:, None]
    store_tile(Qg + t0 * sHK + i_h * K, x * scale * tl.exp2(G), ot, m_t, sHK, cols, m_c, EVEN_K)
    x = load_tile(k_b, ot, m_t, s_k, cols, m_c, EVEN_K)
    if USE_L2:
        r = 1.0 / tl.sqrt(tl.sum(x * x, 1) + 1e-6)
        tl.store(rk_o + (t0 + ot) * H + i_h, r, mask=m_t)
        x = x * r[:, None]
    store_tile(Kd + t0 * sHK + i_h * K, x * tl.exp2(tl.minimum(glast[None, :] - G, 0.0)), ot, m_t, sHK, cols,
               m_c, EVEN_K)
    b = load_beta(b_b, ot, m_t, s_b, USE_SIGMOID)
    store_tile(W_b, x * b[:, None] * tl.exp2(G), ot, m_t, sHK, cols, m_c, EVEN_K)  # Y, read back by the solve kernel
    upper = ot[None, :] >= (ot[:, None] // BC + 1) * BC
    tl.store(A_b + ot[:, None] * sHA + ot[None, :], tl.zeros([BT, BT], dtype=dt), mask=m_t[:, None] & upper)


@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def chunk_kda_fwd_solve_kernel(
    v, beta, Wt, U, Mo, Akk_s,
    cu_seqlens, chunk_seq, chunk_offsets,
    T, N, NT_seq, s_v, s_b,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, IS_VARLEN: tl.constexpr, USE_SIGMOID: tl.constexpr,
    PREC: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    n, i_c, bos, eos, valid = chunk_of_program(i_t, i_b, T, N, NT_seq, cu_seqlens, chunk_seq,
                                               chunk_offsets, IS_VARLEN)
    if not valid:
        return
    t0 = bos + i_c * BT
    n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
    ot = tl.arange(0, BT)
    m_t = ot < n_valid
    sHK = H * K
    sHA = H * BT
    dt = Wt.dtype.element_ty
    W_b = Wt + t0 * sHK + i_h * K
    S_b = Akk_s + t0 * sHA + i_h * BT
    M_b = Mo + t0 * sHA + i_h * BT

    # ---- M = (I + Akk)^-1, block row by block row (fp32 products), stored in the compute dtype
    o = tl.arange(0, BC)
    m0 = o < n_valid
    m1 = o < n_valid - BC
    m2 = o < n_valid - 2 * BC
    m3 = o < n_valid - 3 * BC
    zd = tl.zeros([BC, BC], dtype=dt)
    M00 = _inv_unit_lower(_load_blk(S_b, 0, m0, sHA, 0, BC), BC)
    _store_arow(M_b, 0, m0, sHA, M00.to(dt), zd, zd, zd, BC)
    A10 = _load_blk(S_b, BC, m1, sHA, 0, BC)
    M11 = _inv_unit_lower(_load_blk(S_b, BC, m1, sHA, BC, BC), BC)
    M10 = -_mm(_mm(M11, A10), M00)
    _store_arow(M_b, BC, m1, sHA, M10.to(dt), M11.to(dt), zd, zd, BC)
    A20 = _load_blk(S_b, 2 * BC, m2, sHA, 0, BC)
    A21 = _load_blk(S_b, 2 * BC, m2, sHA, BC, BC)
    M22 = _inv_unit_lower(_load_blk(S_b, 2 * BC, m2, sHA, 2 * BC, BC), BC)
    M21 = -_mm(_mm(M22, A21), M11)
    M20 = -_mm(M22, _mm(A20, M00) + _mm(A21, M10))
    _store_arow(M_b, 2 * BC, m2, sHA, M20.to(dt), M21.to(dt), M22.to(dt), zd, BC)
    A30 = _load_blk(S_b, 3 * BC, m3, sHA, 0, BC)
    A31 = _load_blk(S_b, 3 * BC, m3, sHA, BC, BC)
    A32 = _load_blk(S_b, 3 * BC, m3, sHA, 2 * BC, BC)
    M33 = _inv_unit_lower(_load_blk(S_b, 3 * BC, m3, sHA, 3 * BC, BC), BC)
    M32 = -_mm(_mm(M33, A32), M22)
    M31 = -_mm(M33, _mm(A31, M11) + _mm(A32, M21))
    M30 = -_mm(M33, _mm(A30, M00) + _mm(A31, M10) + _mm(A32, M20))
    _store_arow(M_b, 3 * BC, m3, sHA, M30.to(dt), M31.to(dt), M32.to(dt), M33.to(dt), BC)
    tl.debug_barrier()

    # ---- W = M Y (Y stored in the W buffer by the prep kernel), U = M (beta v), by column slices
    Mf = tl.load(M_b + ot[:, None] * sHA + ot[None, :], mask=m_t[:, None], other=0.0).to(dt)
    b = load_beta(beta + t0 * s_b + i_h, ot, m_t, s_b, USE_SIGMOID)
    BKC: tl.constexpr = 64 if BK > 64 else BK
    ck = tl.arange(0, BKC)
    for kk in tl.static_range(0, BK, BKC):
        m_k = kk + ck < K
        Y = load_tile(W_b + kk, ot, m_t, sHK, ck, m_k, False).to(dt)
        store_tile(W_b + kk, tl.dot(Mf, Y, input_precision=PREC), ot, m_t, sHK, ck, m_k, False)
    BVC: tl.constexpr = 64 if BV > 64 else BV
    cv = tl.arange(0, BVC)
    v_b = v + t0 * s_v + i_h * V
    U_b = U + t0 * (H * V) + i_h * V
    for vv in tl.static_range(0, BV, BVC):
        m_v = vv + cv < V
        X = (load_tile(v_b + vv, ot, m_t, s_v, cv, m_v, False) * b[:, None]).to(dt)
        store_tile(U_b + vv, tl.dot(Mf, X, input_precision=PREC), ot, m_t, H * V, cv, m_v, False)


def chunk_fwd_intra_launch(q, k, v, f, beta, A_log, dt_bias, scale, idx, T, bufs, *, use_gate, use_l2,
                           use_sigmoid, num_warps=8, num_stages=1, diag_warps=2, solve_warps=2, exact_warps=2,
                           span=SPAN):
    """Prep, diagonal blocks, solve. q, k, f: [*, H, K] token-major views; bufs: dict of output buffers."""
    H, K = q.shape[-2], q.shape[-1]
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    B = 1 if idx.chunk_seq is not None else idx.N
    grid = (idx.NT if idx.chunk_seq is not None else idx.NT_seq, B * H)
    varlen = idx.chunk_seq is not None
    chunk_kda_fwd_prep_kernel[grid](
        q, k, f, beta, A_log, dt_bias,
        bufs["W"], bufs["Kd"], bufs["Qg"], bufs["Aqk"], bufs["gam"], bufs["G"], bufs.get("rq"), bufs.get("rk"),
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, q.stride(-3), k.stride(-3), f.stride(-3), beta.stride(-2), scale,
        H=H, K=K, BK=BK, BT=64, BC=16,
        IS_VARLEN=varlen, USE_GATE=use_gate, HAS_DTB=dt_bias is not None,
        USE_L2=use_l2, USE_SIGMOID=use_sigmoid,
        num_warps=num_warps, num_stages=num_stages,
    )
    chunk_fwd_diag_launch(q, k, beta, scale, idx, T, bufs, use_l2=use_l2, use_sigmoid=use_sigmoid,
                          num_warps=diag_warps, exact_warps=exact_warps, span=span)
    chunk_kda_fwd_solve_kernel[grid](
        v, beta, bufs["W"], bufs["U"], bufs["M"], bufs["Akk"],
        bufs.get("cu_seqlens"), idx.chunk_seq, idx.chunk_offsets,
        T, idx.N, idx.NT_seq, v.stride(-3), beta.stride(-2),
        H=H, K=K, V=V, BK=BK, BV=BV, BT=64, BC=16, IS_VARLEN=varlen, USE_SIGMOID=use_sigmoid,
        PREC=dot_precision(bufs["W"].dtype),
        num_warps=solve_warps, num_stages=1,
    )
