"""Causal depthwise short conv1d (+ SiLU) with a conv-state pool, in Triton: varlen prefill and decode.

Same contract as `naive_causal_conv1d`: x [T, C] holds the tokens of N sequences back to back
(`cu_seqlens` [N + 1]; None = one sequence); weight [C, W] (or [C, 1, W]), column W - 1 multiplies the
current token; conv_state [S, W - 1, C] holds per-slot windows of the last W - 1 *pre-conv* inputs,
oldest first, picked by `state_indices` [N] (None = slot n for sequence n). fp32 math, output in x's
dtype, state stored in the pool's dtype. A negative index is a padding row: zero output, no slot
touched. Rows past cu_seqlens[N] are written as zeros.

Two launches, both with grids that depend on shapes only (CUDA-graph safe, no host sync):
1. `_conv_fwd_kernel`, grid (token blocks, channel blocks): each token finds its sequence by counting
   the sequence starts <= t, reads its W - 1 predecessors from x or, before the sequence start, from
   the sequence's state window, and writes the output.
2. `_conv_state_kernel`, grid (sequences, channel blocks): writes each window's new W - 1 inputs (the
   last W - 1 of old window ++ new tokens, so sequences shorter than W - 1 keep part of the old window).
   It runs after (1) on the same stream, so (1) always reads the old window.
Decode (`decode=True`: every sequence has exactly one token, token n is sequence n's) takes one launch
instead: `_conv_decode_kernel`, grid (sequences, channel blocks), reads the window and the new input,
writes the output and the shifted window; the same fp32 tap order as (1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import ConvError



@triton.jit(do_not_specialize=["N"])  # N varies per batch: one compile
def _conv_fwd_kernel(x, w, y, state, cu_seqlens, state_indices, T, N,
                     sx_t, sy_t, sw_c, sw_j, ss_n, ss_r,
                     C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
                     NUM_NB: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_STATE: tl.constexpr, HAS_IDX: tl.constexpr,
                     SILU: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_t = pid_t * BT + tl.arange(0, BT)
    o_c = pid_c * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C

    if IS_VARLEN:
        # sequence of token t: the number of starts cu[1..N-1] that are <= t
        # (NUM_NB = cdiv(N - 1, BN) blocks, a constexpr: a runtime-bounded loop that Triton folds to
        # zero trips when it specialises N == 1 crashes its coalescing pass)
        seq = tl.zeros([BT], dtype=tl.int32)
        for i_nb in range(NUM_NB):
            o_n = 1 + i_nb * BN + tl.arange(0, BN)
            starts = tl.load(cu_seqlens + o_n, mask=o_n < N, other=2147483647).to(tl.int32)
            seq += tl.sum((starts[None, :] <= o_t[:, None]).to(tl.int32), 1)
        bos = tl.load(cu_seqlens + seq).to(tl.int32)
        eos = tl.load(cu_seqlens + seq + 1).to(tl.int32)
        live = m_t & (o_t < eos)
    else:
        seq = tl.zeros([BT], dtype=tl.int32)
        bos = seq
        live = m_t
    if HAS_IDX:
        slot = tl.load(state_indices + seq).to(tl.int64)
        live = live & (slot >= 0)
        slot = tl.maximum(slot, 0)
    else:
        slot = seq.to(tl.int64)

    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        p = o_t - (W - 1) + j  # input position feeding tap j
        in_x = p >= bos
        m_x = (live & in_x)[:, None] & m_c[None, :]
        xv = tl.load(x + tl.maximum(p, 0).to(tl.int64)[:, None] * sx_t + o_c[None, :], mask=m_x,
                     other=0.0).to(tl.float32)
        if HAS_STATE:
            r = tl.maximum(p - bos + (W - 1), 0)  # window row, in [0, W - 2] when p < bos
            m_s = (live & (p < bos))[:, None] & m_c[None, :]
            xv += tl.load(state + slot[:, None] * ss_n + r[:, None] * ss_r + o_c[None, :], mask=m_s,
                          other=0.0).to(tl.float32)
        wj = tl.load(w + o_c * sw_c + j * sw_j, mask=m_c, other=0.0).to(tl.float32)
        acc += wj[None, :] * xv
    if SILU:
        acc = acc * tl.sigmoid(acc)
    acc = tl.where(live[:, None], acc, 0.0)
    tl.store(y + o_t.to(tl.int64)[:, None] * sy_t + o_c[None, :], acc.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _conv_state_kernel(x, state, cu_seqlens, state_indices, T, sx_t, ss_n, ss_r,
                       C: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
                       IS_VARLEN: tl.constexpr, HAS_IDX: tl.constexpr):
    i_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        bos = 0
        eos = T
    if HAS_IDX:
        slot = tl.load(state_indices + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    if slot >= 0:
        o_c = pid_c * BC + tl.arange(0, BC)
        m_c = o_c < C
        r = tl.arange(0, BW)
        m_r = r < W - 1
        i = (eos - bos) + r  # row of (old window ++ new tokens) that becomes window row r
        from_old = i < W - 1
        p_s = state + slot * ss_n
        old = tl.load(p_s + tl.minimum(i, W - 2)[:, None] * ss_r + o_c[None, :],
                      mask=(m_r & from_old)[:, None] & m_c[None, :], other=0.0)
        src = tl.maximum(eos - (W - 1) + r, 0).to(tl.int64)
        new = tl.load(x + src[:, None] * sx_t + o_c[None, :],
                      mask=(m_r & ~from_old)[:, None] & m_c[None, :], other=0.0)
        val = tl.where(from_old[:, None], old.to(tl.float32), new.to(tl.float32))
        tl.debug_barrier()  # every old row is read before any is overwritten
        tl.store(p_s + r[:, None] * ss_r + o_c[None, :], val.to(state.dtype.element_ty),
                 mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _conv_decode_kernel(x, w, y, state, state_indices, sx_t, sy_t, sw_c, sw_j, ss_n, ss_r,
                        C: tl.constexpr, W: tl.constexpr, BC: tl.constexpr, HAS_IDX: tl.constexpr,
                        SILU: tl.constexpr):
    i_n = tl.program_id(0)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    if HAS_IDX:
        slot = tl.load(state_indices + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    live = slot >= 0
    slot = tl.maximum(slot, 0)
    m = m_c & live
    p_s = state + slot * ss_n
    acc = tl.zeros([BC], dtype=tl.float32)
    for j in tl.static_range(W - 1):  # taps 0 .. W - 2 read the window, oldest first (the prefill order)
        wj = tl.load(w + o_c * sw_c + j * sw_j, mask=m_c, other=0.0).to(tl.float32)
        acc += wj * tl.load(p_s + j * ss_r + o_c, mask=m, other=0.0).to(tl.float32)
    xv = tl.load(x + i_n.to(tl.int64) * sx_t + o_c, mask=m, other=0.0)
    acc += tl.load(w + o_c * sw_c + (W - 1) * sw_j, mask=m_c, other=0.0).to(tl.float32) * xv.to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    acc = tl.where(live, acc, 0.0)
    tl.store(y + i_n.to(tl.int64) * sy_t + o_c, acc.to(y.dtype.element_ty), mask=m_c)
    # shift the window: row j <- row j + 1, the last row <- x. A thread reads and writes the same channels,
    # and reads row j + 1 before it overwrites it (program order on possibly aliasing pointers).
    for j in tl.static_range(W - 1):
        if j < W - 2:
            v = tl.load(p_s + (j + 1) * ss_r + o_c, mask=m, other=0.0)
        else:
            v = xv
        tl.store(p_s + j * ss_r + o_c, v.to(state.dtype.element_ty), mask=m)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConvError(f"causal_conv1d: {msg}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None, state_indices: torch.Tensor | None = None,
                  activation: str | None = "silu", decode: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d (+ SiLU) over a varlen token batch, updating the conv-state pool in place.

    Args:
        x: [T, C] tokens of all sequences back to back (channels contiguous).
        weight: [C, W] or [C, 1, W]; column W - 1 multiplies the current token.
        conv_state: [S, W - 1, C] pool (channels contiguous) or None (zero history, nothing stored).
        cu_seqlens: int [N + 1] or None (one sequence); state_indices: int [N] or None (slot n).
        activation: "silu" or None.
        decode: every sequence has exactly one token (token n belongs to sequence n, T == N) and a
            conv_state: one fused launch (output + window update).
    Returns:
        y [T, C] in x's dtype.
    """
    if activation not in ("silu", None):
        raise ConvError(f"causal_conv1d: unsupported activation {activation!r} (use 'silu' or None)")
    _check(x.dim() == 2, f"x must be [T, C], got shape {tuple(x.shape)}")
    T, C = x.shape
    _check(weight.shape[0] == C and weight.numel() % C == 0, f"weight must be [C={C}, W], got {tuple(weight.shape)}")
    W = weight.numel() // C
    weight = weight.reshape(C, W)
    _check(W >= 2, f"kernel width must be >= 2, got {W}")
    if x.stride(1) != 1:
        x = x.contiguous()
    N = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    _check(cu_seqlens is None or (cu_seqlens.dim() == 1 and N >= 1), "cu_seqlens must be [N + 1] with N >= 1")
    if state_indices is not None:
        _check(state_indices.shape == (N,), f"state_indices must be [N] = [{N}], got {tuple(state_indices.shape)}")
    if conv_state is not None:
        _check(conv_state.dim() == 3 and conv_state.shape[1:] == (W - 1, C) and conv_state.stride(2) == 1,
               f"conv_state must be [S, {W - 1}, {C}] with contiguous channels, got {tuple(conv_state.shape)}")
    y = torch.empty(T, C, dtype=x.dtype, device=x.device)
    if decode:
        _check(conv_state is not None and T == N, f"decode needs a conv_state and one token per sequence "
                                                  f"(T={T}, N={N})")
        if T > 0:
            BC = min(256, triton.next_power_of_2(C))
            _conv_decode_kernel[(N, triton.cdiv(C, BC))](
                x, weight, y, conv_state, state_indices if state_indices is not None else y,
                x.stride(0), y.stride(0), *weight.stride(), *conv_state.stride()[:2],
                C=C, W=W, BC=BC, HAS_IDX=state_indices is not None,
                SILU=activation == "silu", num_warps=4)
        return y
    dummy = y
    is_varlen = cu_seqlens is not None
    has_idx = state_indices is not None
    cu = cu_seqlens if is_varlen else dummy
    idx = state_indices if has_idx else dummy
    st = conv_state if conv_state is not None else dummy
    ss = conv_state.stride()[:2] if conv_state is not None else (0, 0)
    if T > 0:
        BT, BC, BN = 16, min(128, triton.next_power_of_2(C)), 256
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC))
        _conv_fwd_kernel[grid](x, weight, y, st, cu, idx, T, N, x.stride(0), y.stride(0), *weight.stride(), *ss,
                               C=C, W=W, BT=BT, BC=BC, BN=BN, NUM_NB=triton.cdiv(N - 1, BN), IS_VARLEN=is_varlen,
                               HAS_STATE=conv_state is not None, HAS_IDX=has_idx, SILU=activation == "silu",
                               num_warps=4)
    if conv_state is not None:
        BC = min(256, triton.next_power_of_2(C))
        _conv_state_kernel[(N, triton.cdiv(C, BC))](x, conv_state, cu, idx, T, x.stride(0), *ss,
                                                    C=C, W=W, BW=triton.next_power_of_2(W - 1), BC=BC,
                                                    IS_VARLEN=is_varlen, HAS_IDX=has_idx, num_warps=4)
    return y
