"""RMSNorm with the residual add folded in, differentiable, in Triton: the decoder norms in training.

Forward, per row (`_rms_norm_train_fwd_kernel`, one program a row), in the reference's order
(`naive.naive_fused_rms_norm`):

    s = residual + branch        in fp32, rounded to the stream dtype promote(residual, branch)
    y = weight * (float(s) * rstd).to(s.dtype),  rstd = rsqrt(mean(float(s)^2) + eps),  stored in `out_dtype`

`out_dtype` is the autocast dtype under autocast (every consumer of y casts it to that dtype anyway, so
the row is cast once here instead of once per projection, and the saved activation is the small one),
else promote(weight, s) as the reference returns. Only s and rstd [N] fp32 are kept for the backward
(the eager form keeps three fp32 copies of the row); the weight gradient is reduced per program over a
stride of rows into [programs, D] fp32 partials, summed afterwards.

Backward (`_rms_norm_train_bwd_kernel`), with xhat = float(s) * rstd and g = dy * weight:
    ds = rstd * (g - xhat * mean(g * xhat)) + d(stream)    -> the gradient of residual and of branch
    dweight = sum_rows dy * xhat
(the rounding of xhat to s's dtype is taken as the identity in the backward). No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import NormError

MAX_PROGRAMS = 1024  # backward programs (each strides over rows, one fp32 [D] weight-gradient partial)


@triton.jit
def _rms_norm_train_fwd_kernel(x, r, w, y, s_out, rstd_out, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               HAS_RES: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    v = tl.load(x + n * D + o, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v = v + tl.load(r + n * D + o, mask=m, other=0.0).to(tl.float32)
        v = v.to(s_out.dtype.element_ty)
        tl.store(s_out + n * D + o, v, mask=m)
        v = v.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(v * v, 0) / D + eps)
    tl.store(rstd_out + n, rstd)
    xn = (v * rstd).to(s_out.dtype.element_ty).to(tl.float32)
    wv = tl.load(w + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y + n * D + o, (wv * xn).to(y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_train_bwd_kernel(s, rstd_in, w, dy, dres, ds_out, dw_part, N, P, D: tl.constexpr,
                               BLOCK_D: tl.constexpr, HAS_DRES: tl.constexpr):
    pid = tl.program_id(0)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    wv = tl.load(w + o, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    n = pid.to(tl.int64)
    while n < N:
        v = tl.load(s + n * D + o, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_in + n)
        xhat = v * rstd
        g = tl.load(dy + n * D + o, mask=m, other=0.0).to(tl.float32)
        dw += g * xhat
        gw = g * wv
        d = rstd * (gw - xhat * (tl.sum(gw * xhat, 0) / D))
        if HAS_DRES:
            d += tl.load(dres + n * D + o, mask=m, other=0.0).to(tl.float32)
        tl.store(ds_out + n * D + o, d.to(ds_out.dtype.element_ty), mask=m)
        n += P
    tl.store(dw_part + pid.to(tl.int64) * D + o, dw, mask=m)


class RMSNormTrainFunction(torch.autograd.Function):
    """(branch [N, D], residual [N, D] or None, weight [D]) -> (y [N, D] in out_dtype, stream [N, D]), or y
    alone without a residual (the stream is the branch itself)."""

    @staticmethod
    def forward(ctx, branch, residual, weight, eps: float, out_dtype: torch.dtype):
        N, D = branch.shape
        has_res = residual is not None
        sdtype = torch.promote_types(branch.dtype, residual.dtype) if has_res else branch.dtype
        stream = torch.empty(N, D, dtype=sdtype, device=branch.device) if has_res else branch
        y = torch.empty(N, D, dtype=out_dtype, device=branch.device)
        rstd = torch.empty(N, dtype=torch.float32, device=branch.device)
        if N:
            _rms_norm_train_fwd_kernel[(N,)](branch, residual if has_res else branch, weight, y, stream, rstd,
                                             float(eps), D=D, BLOCK_D=triton.next_power_of_2(D), HAS_RES=has_res,
                                             num_warps=8 if D >= 2048 else 4)
        ctx.save_for_backward(stream, rstd, weight)
        ctx.has_res = has_res
        ctx.dtypes = (branch.dtype, residual.dtype if has_res else None)
        return (y, stream) if has_res else y

    @staticmethod
    def backward(ctx, dy, dstream=None):
        stream, rstd, weight = ctx.saved_tensors
        N, D = stream.shape
        bdtype, rdtype = ctx.dtypes
        out_dtype = torch.promote_types(bdtype, rdtype) if rdtype is not None else bdtype
        ds = torch.empty(N, D, dtype=out_dtype, device=stream.device)
        P = max(1, min(N, MAX_PROGRAMS))
        dw_part = torch.empty(P, D, dtype=torch.float32, device=stream.device)
        if dy is None:
            dy = torch.zeros(N, D, dtype=stream.dtype, device=stream.device)
        dy = dy.contiguous()
        has_d = ctx.has_res and dstream is not None
        if has_d:
            dstream = dstream.contiguous()
        if N:
            _rms_norm_train_bwd_kernel[(P,)](stream, rstd, weight, dy, dstream if has_d else dy, ds, dw_part, N, P,
                                             D=D, BLOCK_D=triton.next_power_of_2(D), HAS_DRES=has_d,
                                             num_warps=8 if D >= 2048 else 4)
            dw = dw_part.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        d_branch = ds if ds.dtype == bdtype else ds.to(bdtype)
        d_res = None
        if ctx.has_res:
            d_res = ds if ds.dtype == rdtype else ds.to(rdtype)
        return d_branch, d_res, dw, None, None


def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None):
    """x [N, D] (the branch), weight [D], residual [N, D] or None -> y, or (y, residual + x) with a residual.
    out_dtype: None = promote(weight, stream), as the reference."""
    if x.dim() != 2 or weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        raise NormError(f"rms_norm_train: x must be [N, D], weight [D] and residual [N, D]; got x {tuple(x.shape)}, "
                        f"weight {tuple(weight.shape)}, residual {None if residual is None else tuple(residual.shape)}")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    stream_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    out_dtype = out_dtype or torch.promote_types(weight.dtype, stream_dtype)
    return RMSNormTrainFunction.apply(x, residual, weight, eps, out_dtype)
