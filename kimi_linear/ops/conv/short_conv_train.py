"""Differentiable causal depthwise short conv1d (+ SiLU) over packed documents, in Triton (training on CUDA).

Same contract as `varlen.causal_conv1d_varlen` (and `naive.naive_causal_conv1d` without a state pool):
x [T, C] holds the tokens of N documents back to back (`cu_seqlens` [N + 1], None = one document),
weight [C, W], column W - 1 multiplying the current token; every document starts from a zero window
(tap j of token t reads token t - (W - 1) + j only when that token lies in t's document, i.e. when
W - 1 - j <= pos[t], pos = the token's offset in its document). fp32 math, output in x's dtype.

x may be a row-strided view (unit channel stride), e.g. the q|k|v columns of a wider projection output:
it is read in place. `ShortConvFunction` keeps only x, the weight and pos for the backward (the torch form keeps ~10 fp32
copies of the [T, C] row); two launches, grid (token blocks, channel blocks), no host sync:
- `_conv_train_fwd_kernel`: y[t] = act(sum_j w[:, j] x[t - (W - 1) + j]);
- `_conv_train_bwd_kernel`: recomputes the pre-activation a at t .. t + W - 1, da = dy * act'(a), then
  dx[t] = sum_s w[:, W - 1 - s] da[t + s] over the s with t + s in t's document (pos[t + s] >= s), and
  the block's partial weight gradient sum_t da[t] x[t - s] (pos[t] >= s) into dw_part [blocks, C, W],
  summed over the blocks afterwards in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import ConvError

BT, BC = 32, 128  # tokens x channels per program


@triton.jit
def _conv_train_fwd_kernel(x, w, pos, y, T, C, SX, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           SILU: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C
    p = tl.load(pos + o_t, mask=m_t, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        back = W - 1 - j
        src = o_t - back
        ok = m_t & (p >= back)
        xv = tl.load(x + src.to(tl.int64)[:, None] * SX + o_c[None, :], mask=ok[:, None] & m_c[None, :], other=0.0)
        wv = tl.load(w + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wv[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + o_t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _conv_train_bwd_kernel(x, w, pos, dy, dx, dw_part, T, C, SX, W: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, SILU: tl.constexpr):
    pid_t = tl.program_id(0)
    o_t = pid_t * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C
    dxa = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        # the pre-activation and its gradient at tokens t + s
        ts = o_t + s
        m_s = ts < T
        ps = tl.load(pos + ts, mask=m_s, other=0)
        a = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(W):
            back = W - 1 - j
            ok = m_s & (ps >= back)
            xv = tl.load(x + (ts - back).to(tl.int64)[:, None] * SX + o_c[None, :], mask=ok[:, None] & m_c[None, :],
                         other=0.0).to(tl.float32)
            wv = tl.load(w + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
            a += xv * wv[None, :]
        g = tl.load(dy + ts.to(tl.int64)[:, None] * C + o_c[None, :], mask=m_s[:, None] & m_c[None, :],
                    other=0.0).to(tl.float32)
        if SILU:
            sg = tl.sigmoid(a)
            g = g * sg * (1.0 + a * (1.0 - sg))
        # dx[t] gets w[:, W - 1 - s] * da[t + s] when t + s lies in t's document
        inside = m_s & (ps >= s)
        wv = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        dxa += tl.where(inside[:, None], g, 0.0) * wv[None, :]
        if s == 0:  # this block's tokens: their partial weight gradient, sum_t da[t] x[t - back]
            for j in tl.static_range(W):
                back = W - 1 - j
                ok = m_t & (ps >= back)
                xv = tl.load(x + (o_t - back).to(tl.int64)[:, None] * SX + o_c[None, :],
                             mask=ok[:, None] & m_c[None, :], other=0.0).to(tl.float32)
                tl.store(dw_part + pid_t.to(tl.int64) * C * W + o_c * W + j, tl.sum(g * xv, 0), mask=m_c)
    tl.store(dx + o_t.to(tl.int64)[:, None] * C + o_c[None, :], dxa.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


def positions(T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """int32 [T]: each token's offset from the start of its document (no host sync)."""
    t = torch.arange(T, device=device, dtype=torch.int32)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    doc = torch.searchsorted(cu[1:], t, right=True).clamp_max(cu.numel() - 2)
    return (t - cu[doc]).to(torch.int32).contiguous()


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, pos, silu: bool):
        T, C = x.shape
        W = weight.shape[-1]
        w = weight.reshape(C, W).contiguous()
        y = torch.empty(T, C, dtype=x.dtype, device=x.device)
        if T:
            grid = (triton.cdiv(T, BT), triton.cdiv(C, BC))
            _conv_train_fwd_kernel[grid](x, w, pos, y, T, C, x.stride(0), W=W, BT=BT, BC=BC, SILU=silu, num_warps=4)
        ctx.save_for_backward(x, w, pos)
        ctx.silu = silu
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, pos = ctx.saved_tensors
        T, C = x.shape
        W = w.shape[1]
        dy = dy.contiguous()
        dx = torch.empty(T, C, dtype=x.dtype, device=x.device)
        nb = triton.cdiv(T, BT)
        dw_part = torch.empty(nb, C, W, dtype=torch.float32, device=x.device)
        if T:
            _conv_train_bwd_kernel[(nb, triton.cdiv(C, BC))](x, w, pos, dy, dx, dw_part, T, C, x.stride(0), W=W, BT=BT, BC=BC,
                                                             SILU=ctx.silu, num_warps=4)
        dw = dw_part.sum(0).reshape(ctx.w_shape).to(ctx.w_dtype)
        return dx, dw, None, None


def causal_conv1d_train(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                        activation: str | None = "silu") -> torch.Tensor:
    """x [T, C], weight [C, W] or [C, 1, W] -> y [T, C] in x's dtype, differentiable in x and weight."""
    if x.dim() != 2:
        raise ConvError(f"causal_conv1d_train: x must be [T, C], got {tuple(x.shape)}")
    T, C = x.shape
    W = weight.shape[-1]
    if weight.numel() != C * W:
        raise ConvError(f"causal_conv1d_train: weight {tuple(weight.shape)} does not match {C} channels")
    if not 1 <= W <= 4:
        raise ConvError(f"causal_conv1d_train: kernel width {W} not supported (1 .. 4)")
    if activation not in (None, "silu"):
        raise ConvError(f"causal_conv1d_train: unsupported activation {activation!r}")
    if x.stride(1) != 1:
        x = x.contiguous()  # rows may be strided (a view of a wider projection output): read in place
    return ShortConvFunction.apply(x, weight, positions(T, cu_seqlens, x.device), activation == "silu")
