"""Fused recurrent KDA (Triton): the decode step, one or a few tokens per sequence, over a state pool.

Same contract as `naive_recurrent_kda` (spec sections 3.1(6), 4.3, 4.4): q, k [B, T, H, K]; v [B, T, H, V];
g [B, T, H, K] log decay (or the raw gate input f with `use_gate_in_kernel`); beta [B, T, H] (or its
logits); states [N, H, K, V] fp32 with o_t = S_t^T (scale q_t); varlen through `cu_seqlens` with B = 1.

Design and invariants:
- One program per (sequence, head, V tile): it holds the K x BV fp32 state tile in registers for all of
  its sequence's tokens, reads the tile once and writes it once. The gate, beta sigmoid and q/k L2 norm
  (eps 1e-6 inside the sqrt) are computed in the kernel in fp32 (each V tile recomputes them: cheap).
- `state_indices` [N]: `initial_state` is a pool [S, H, K, V]; sequence n reads slot state_indices[n] and
  writes it back in place. A negative index touches no slot and its output rows are written as zeros.
  With `cu_seqlens`, token rows past cu_seqlens[N] are written as zeros too, so `o` is fully defined.
- CUDA-graph safe: the grid and every launch decision depend on tensor shapes only; no host sync; with
  `out=` (and a pool) the call allocates nothing.
- BV and num_warps come from the number of (sequence, head) pairs: small batches get small tiles (enough
  programs to fill the GPU), large batches large tiles (long coalesced rows, streaming at bandwidth).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kimi_linear.errors import KDAError



@triton.jit
def _softplus_neg_gate(x, a):
    """-a * softplus(x) in fp32 with torch's threshold 20 and an accurate log1p (Goldberg's form)."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    tiny = u == 1.0
    lp = tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))
    return -a * tl.where(x > 20.0, x, lp)


@triton.jit
def _kda_recurrent_kernel(
    q, k, v, g, beta, A_log, dt_bias, o, h0, ht, cu_seqlens, state_indices,
    scale, T, N,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h,
    sb_b, sb_t, sb_h, so_b, so_t, so_h, s_h0, s_ht,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_POOL: tl.constexpr, HAS_H0: tl.constexpr, HAS_HT: tl.constexpr,
    USE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, L2NORM: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // H
    i_h = i_nh % H

    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_b = 0
    else:
        bos = 0
        eos = T
        i_b = i_n.to(tl.int64)
    if IS_POOL:
        slot = tl.load(state_indices + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    tile = i_h * K * V + o_k[:, None] * V + o_v[None, :]

    if HAS_H0:
        S = tl.load(h0 + slot * s_h0 + tile, mask=m_s & valid, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_GATE:
        a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        if HAS_BIAS:
            bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    p_q = q + i_b * sq_b + bos * sq_t + i_h * sq_h + o_k
    p_k = k + i_b * sk_b + bos * sk_t + i_h * sk_h + o_k
    p_g = g + i_b * sg_b + bos * sg_t + i_h * sg_h + o_k
    p_v = v + i_b * sv_b + bos * sv_t + i_h * sv_h + o_v
    p_beta = beta + i_b * sb_b + bos * sb_t + i_h * sb_h
    p_o = o + i_b * so_b + bos * so_t + i_h * so_h + o_v
    t = bos
    while t < eos:  # a while loop: the interpreter cannot index `range` with a runtime scalar
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(p_g, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + 1e-6)
        b_q = b_q * scale
        if USE_GATE:
            if HAS_BIAS:
                b_g = b_g + bias
            b_g = _softplus_neg_gate(b_g, a)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        S = S * tl.exp(b_g)[:, None]
        u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))
        S = S + b_k[:, None] * u[None, :]
        b_o = tl.sum(S * b_q[:, None], 0)
        b_o = tl.where(valid, b_o, 0.0)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)
        p_q += sq_t
        p_k += sk_t
        p_g += sg_t
        p_v += sv_t
        p_beta += sb_t
        p_o += so_t
        t += 1

    if HAS_HT:
        tl.store(ht + slot * s_ht + tile, S.to(ht.dtype.element_ty), mask=m_s & valid,
                 eviction_policy="evict_first")
    if IS_VARLEN:
        # rows past the last sequence (a padded token buffer) get zeros, written by the last sequence
        if i_n == N - 1:
            zero = tl.zeros([BV], dtype=o.dtype.element_ty)
            while t < T:
                tl.store(p_o, zero, mask=m_v)
                p_o += so_t
                t += 1


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_config(num_heads_total: int, V: int, device: torch.device) -> tuple[int, int]:
    """(BV, num_warps) for N * H = `num_heads_total` (sequence, head) pairs; depends on shapes only.

    Largest V tile (up to 64) that still gives at least two programs per SM; the warp count keeps the
    K x BV fp32 tile at about 32-64 registers per thread. With 16 or more programs per SM even at BV = 128
    (large decode batches) the whole 128-wide rows, 4 warps: on the H200 at B = 256, H = 32 (one run of
    `benchmarks.kda --decode-sweep`) 295.1 us vs 304.7 at BV = 64 (85.8% vs 83.1% of copy bandwidth);
    at B = 64 BV = 64 stays best (74.5 vs 75.9 us)."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    cap = triton.next_power_of_2(V)
    if cap >= 128 and num_heads_total * triton.cdiv(V, 128) >= 16 * sms:
        return 128, 4
    BV = 8
    for bv in (64, 32, 16, 8):
        if num_heads_total * triton.cdiv(V, bv) >= 2 * sms:
            BV = bv
            break
    BV = min(BV, cap)
    num_warps = {8: 1, 16: 2, 32: 4, 64: 4}.get(BV, 4 if BV < 64 else 8)
    return BV, num_warps


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise KDAError(f"fused_recurrent_kda: {msg}")


def fused_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
                        A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                        use_beta_sigmoid_in_kernel: bool = False, state_indices: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, *, block_v: int | None = None,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-recurrent KDA with fused gate / beta sigmoid / q,k L2 norm; the decode kernel.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (last dim contiguous; other strides free).
        g: [B, T, H, K] log decay, or the raw gate input f when `use_gate_in_kernel`
            (g = -exp(A_log[h]) * softplus(f + dt_bias), softplus threshold 20).
        beta: [B, T, H], or its logits when `use_beta_sigmoid_in_kernel`.
        scale: multiplies q (default K ** -0.5).
        initial_state: [N, H, K, V] (any float dtype), or with `state_indices` the pool [S, H, K, V]
            (updated in place; inner dims contiguous).
        output_final_state: return the final states [N, H, K, V] fp32 (ignored with `state_indices`).
        cu_seqlens: int32/int64 [N + 1] with B = 1 (variable-length batch).
        A_log: H values (any shape), dt_bias: [H * K] or None; fp32.
        state_indices: int [N] pool slots; negative = skip (no slot touched, output rows zero).
        out: optional [B, T, H, V] output buffer (written in full), so that a decode step allocates nothing.
        block_v, num_warps: tuning overrides (None = `decode_config`).
    Returns:
        (o [B, T, H, V] in q's dtype (or `out`), final_state [N, H, K, V] fp32 or None).
    """
    _check(q.dim() == 4, f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check(k.shape == q.shape, f"k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    _check(g.shape == q.shape, f"g shape {tuple(g.shape)} != q shape {tuple(q.shape)}")
    _check(v.dim() == 4 and v.shape[:3] == q.shape[:3], f"v must be [B, T, H, V], got {tuple(v.shape)}")
    _check(beta.shape == q.shape[:3], f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    q, k, v, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, g))
    if cu_seqlens is not None:
        _check(B == 1, f"with cu_seqlens the batch size must be 1, got {B}")
        _check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2, "cu_seqlens must be [N + 1] with N >= 1")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    is_pool = state_indices is not None
    if is_pool:
        _check(initial_state is not None, "state_indices needs the state pool as initial_state")
        _check(state_indices.shape == (N,), f"state_indices must be [N] = [{N}], got {tuple(state_indices.shape)}")
    if initial_state is not None:
        _check(initial_state.dim() == 4 and initial_state.shape[1:] == (H, K, V),
               f"initial_state must be [{'S' if is_pool else N}, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
        if not is_pool:
            _check(initial_state.shape[0] == N, f"initial_state has {initial_state.shape[0]} states for {N} sequences")
        inner_ok = initial_state.stride()[1:] == (K * V, V, 1)
        if not inner_ok:
            _check(not is_pool, "the state pool must be contiguous in its [H, K, V] dims (it is updated in place)")
            initial_state = initial_state.contiguous()
    if use_gate_in_kernel:
        _check(A_log is not None, "use_gate_in_kernel=True needs A_log")
        _check(A_log.numel() == H, f"A_log must hold H = {H} values, got {A_log.numel()}")
        A_log = A_log.reshape(H)
        if dt_bias is not None:
            _check(dt_bias.numel() == H * K, f"dt_bias must hold H * K = {H * K} values, got {dt_bias.numel()}")
            dt_bias = dt_bias.reshape(H * K)
    if out is None:
        out = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    else:
        _check(out.shape == (B, T, H, V) and out.stride(-1) == 1,
               f"out must be [B, T, H, V] = {(B, T, H, V)} with a contiguous last dim, got {tuple(out.shape)}")
    final = None
    if is_pool:
        ht = initial_state
    elif output_final_state:
        final = ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    else:
        ht = None

    BV, nw = decode_config(N * H, V, q.device)
    BV = block_v or BV
    nw = num_warps or nw
    _check(BV >= 1 and BV & (BV - 1) == 0, f"block_v must be a power of two, got {BV}")
    scale = K ** -0.5 if scale is None else float(scale)
    grid = (N * H * triton.cdiv(V, BV),)
    dummy = out
    _kda_recurrent_kernel[grid](
        q, k, v, g, beta,
        A_log if use_gate_in_kernel else dummy,
        dt_bias if (use_gate_in_kernel and dt_bias is not None) else dummy,
        out,
        initial_state if initial_state is not None else dummy,
        ht if ht is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        state_indices if is_pool else dummy,
        scale, T, N,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3], *beta.stride(), *out.stride()[:3],
        initial_state.stride(0) if initial_state is not None else 0,
        ht.stride(0) if ht is not None else 0,
        H=H, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV,
        IS_VARLEN=cu_seqlens is not None, IS_POOL=is_pool, HAS_H0=initial_state is not None,
        HAS_HT=ht is not None, USE_GATE=use_gate_in_kernel,
        HAS_BIAS=use_gate_in_kernel and dt_bias is not None, BETA_SIGMOID=use_beta_sigmoid_in_kernel,
        L2NORM=use_qk_l2norm_in_kernel, num_warps=nw,
    )
    return out, final
