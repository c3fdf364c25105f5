"""KDA's gated output norm, differentiable, in Triton (training on a kernel device).

Same forward as `naive.gated_rms_norm` (and the inference kernel `gated_norm.py`), in fp32 per head row
of K channels: y = (xhat * weight * sigmoid(gate)).to(x.dtype), xhat = x * rsqrt(mean(x^2) + eps).
Only x, gate and the weight are kept for the backward (the eager form keeps four fp32 copies of the
row); the backward recomputes rstd and, with s = sigmoid(gate) and g = dy * weight * s:
    dx = rstd * (g - xhat * mean(g * xhat)),  dgate = dy * xhat * weight * s * (1 - s),
    dweight = sum_rows dy * xhat * s   (per-program [K] partials, summed afterwards).
x and gate are [N, H, K] with any (n, h) strides and a unit last stride. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import NormError

MAX_PROGRAMS = 1024


@triton.jit
def _rows(x, g, R, H, sx_n, sx_h, sg_n, sg_h, rows, K: tl.constexpr, BLOCK_K: tl.constexpr):
    mr = rows < R
    n = (rows // H).to(tl.int64)
    h = (rows % H).to(tl.int64)
    ok = tl.arange(0, BLOCK_K)
    m = mr[:, None] & (ok < K)[None, :]
    xf = tl.load(x + (n * sx_n + h * sx_h)[:, None] + ok[None, :], mask=m, other=0.0).to(tl.float32)
    gf = tl.load(g + (n * sg_n + h * sg_h)[:, None] + ok[None, :], mask=m, other=0.0).to(tl.float32)
    return xf, gf, m


@triton.jit
def _gated_norm_train_fwd_kernel(x, g, w, y, R, H, sx_n, sx_h, sg_n, sg_h, eps, K: tl.constexpr,
                                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    xf, gf, m = _rows(x, g, R, H, sx_n, sx_h, sg_n, sg_h, rows, K, BLOCK_K)
    ok = tl.arange(0, BLOCK_K)
    wf = tl.load(w + ok, mask=ok < K, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 1) / K + eps)
    out = xf * rstd[:, None] * wf[None, :] * tl.sigmoid(gf)
    tl.store(y + rows.to(tl.int64)[:, None] * K + ok[None, :], out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _gated_norm_train_bwd_kernel(x, g, w, dy, dx, dg, dw_part, R, H, sx_n, sx_h, sg_n, sg_h, eps, P,
                                 K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    ok = tl.arange(0, BLOCK_K)
    wf = tl.load(w + ok, mask=ok < K, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    r0 = pid * BLOCK_R
    while r0 < R:
        rows = r0 + tl.arange(0, BLOCK_R)
        xf, gf, m = _rows(x, g, R, H, sx_n, sx_h, sg_n, sg_h, rows, K, BLOCK_K)
        off = rows.to(tl.int64)[:, None] * K + ok[None, :]
        d = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, 1) / K + eps)
        xhat = xf * rstd[:, None]
        s = tl.sigmoid(gf)
        dw += tl.sum(d * xhat * s, 0)
        gw = d * wf[None, :] * s
        dxv = rstd[:, None] * (gw - xhat * (tl.sum(gw * xhat, 1) / K)[:, None])
        dgv = d * xhat * wf[None, :] * s * (1.0 - s)
        tl.store(dx + off, dxv.to(dx.dtype.element_ty), mask=m)
        tl.store(dg + off, dgv.to(dg.dtype.element_ty), mask=m)
        r0 += P * BLOCK_R
    tl.store(dw_part + pid.to(tl.int64) * K + ok, dw, mask=ok < K)


def _launch_shape(K: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    return block_k, max(1, min(16, 2048 // block_k))


class GatedNormTrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps: float):
        N, H, K = x.shape
        y = torch.empty(N, H, K, dtype=x.dtype, device=x.device)
        R = N * H
        block_k, block_r = _launch_shape(K)
        if R:
            _gated_norm_train_fwd_kernel[(triton.cdiv(R, block_r),)](
                x, gate, weight, y, R, H, x.stride(0), x.stride(1), gate.stride(0), gate.stride(1), float(eps),
                K=K, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
        ctx.save_for_backward(x, gate, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight = ctx.saved_tensors
        N, H, K = x.shape
        R = N * H
        block_k, block_r = _launch_shape(K)
        dy = dy.contiguous()
        dx = torch.empty(N, H, K, dtype=x.dtype, device=x.device)
        dg = torch.empty(N, H, K, dtype=gate.dtype, device=x.device)
        P = max(1, min(triton.cdiv(R, block_r), MAX_PROGRAMS))
        dw_part = torch.empty(P, K, dtype=torch.float32, device=x.device)
        if R:
            _gated_norm_train_bwd_kernel[(P,)](
                x, gate, weight, dy, dx, dg, dw_part, R, H, x.stride(0), x.stride(1), gate.stride(0),
                gate.stride(1), float(ctx.eps), P, K=K, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
            dw = dw_part.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        return dx, dg, dw, None


def gated_rms_norm_train(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate: [N, H, K] (unit last stride); weight: [K] -> y [N, H, K] contiguous in x's dtype, differentiable."""
    if x.dim() != 3 or gate.shape != x.shape or weight.shape != x.shape[-1:]:
        raise NormError(f"gated_rms_norm_train: x and gate must be [N, H, K] and weight [K]; got x "
                        f"{tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    return GatedNormTrainFunction.apply(x, gate, weight, eps)
