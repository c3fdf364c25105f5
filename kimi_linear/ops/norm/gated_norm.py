"""Fused gated RMSNorm (Triton): the KDA output norm in one launch.

Same arithmetic, in the same order, as `naive.gated_rms_norm` (spec section 3.1(7)), all in fp32:

    y = (float(x) * rsqrt(mean(float(x)^2) + eps)) * float(weight) * sigmoid(float(gate)),  cast to x's dtype

per head row of K channels, with one [K] weight shared by all heads. x and gate are [N, H, K] with any
(n, h) strides and a unit last stride (views of wider projection outputs need no copy); y is contiguous.
A program normalises BLOCK_R rows. No autograd; CUDA-graph safe (no host sync, shape-only grid).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import NormError



@triton.jit
def _gated_rms_norm_kernel(x, g, w, y, R, H, sx_n, sx_h, sg_n, sg_h, eps,
                           K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < R
    n = (rows // H).to(tl.int64)
    h = (rows % H).to(tl.int64)
    ok = tl.arange(0, BLOCK_K)
    mk = ok < K
    m = mr[:, None] & mk[None, :]
    xf = tl.load(x + (n * sx_n + h * sx_h)[:, None] + ok[None, :], mask=m, other=0.0).to(tl.float32)
    gf = tl.load(g + (n * sg_n + h * sg_h)[:, None] + ok[None, :], mask=m, other=0.0).to(tl.float32)
    wf = tl.load(w + ok, mask=mk, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 1) / K + eps)
    out = xf * rstd[:, None] * wf[None, :] * tl.sigmoid(gf)
    tl.store(y + rows.to(tl.int64)[:, None] * K + ok[None, :], out.to(y.dtype.element_ty), mask=m)


def fused_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate: [N, H, K] (unit last stride); weight: [K] -> y [N, H, K] contiguous, in x's dtype."""
    if x.dim() != 3 or gate.shape != x.shape or weight.shape != x.shape[-1:]:
        raise NormError(f"fused_gated_rms_norm: x and gate must be [N, H, K] and weight [K]; got x "
                         f"{tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    N, H, K = x.shape
    y = torch.empty(N, H, K, dtype=x.dtype, device=x.device)
    R = N * H
    if R:
        block_k = triton.next_power_of_2(K)
        block_r = max(1, min(16, 2048 // block_k))
        _gated_rms_norm_kernel[(triton.cdiv(R, block_r),)](
            x, gate, weight, y, R, H, x.stride(0), x.stride(1), gate.stride(0), gate.stride(1), float(eps),
            K=K, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
    return y
