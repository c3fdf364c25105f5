"""Reference normalisations, bit-for-bit in the order the reference model computes them."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, round to x's dtype, then multiply by `weight` (no (1 + w) offset)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA output norm: rmsnorm(x) * weight * sigmoid(gate), all in fp32, cast to x's dtype.

    x, gate: [..., K]; weight: [K] shared by all heads.
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float() * torch.sigmoid(gate.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (eps inside the sqrt, as the KDA kernels do)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                         branch_weights: torch.Tensor | None = None, tail: int = 0,
                         scatter: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The contract of the fused kernel (`rmsnorm.fused_rms_norm`) in the reference order: the weighted
    branch sum (fp32, rounded to x's dtype), the residual add (rounded), then `rms_norm`; the tail columns
    copied; with `scatter=(dst, slots)` the rows also stored at flat rows `slots` of dst (negative = skip).
    Returns y, or (y, residual + branch) with a residual."""
    if branch_weights is not None:
        x = (x.float() * branch_weights.float()[..., None]).sum(1).to(x.dtype)
    if residual is not None:
        stream = residual + x
        return rms_norm(stream, weight, eps), stream
    if tail:
        D = weight.shape[0]
        y = torch.cat([rms_norm(x[..., :D], weight, eps), x[..., D:]], dim=-1)
    else:
        y = rms_norm(x, weight, eps)
    if scatter is not None:
        dst, slots = scatter
        flat, rows = dst.view(-1, dst.shape[-1]), y.reshape(-1, y.shape[-1])
        keep = slots >= 0
        src = rows[keep].to(dst.dtype)
        if dst.element_size() == 1:  # float8 caches: the CPU's index_copy_ has no fp8 kernel; copy the bytes
            flat, src = flat.view(torch.uint8), src.view(torch.uint8)
        flat.index_copy_(0, slots[keep].long(), src)
    return y
