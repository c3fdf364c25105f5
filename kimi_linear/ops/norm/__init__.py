"""Normalisation ops: RMSNorm (with the residual add / MoE branch sum / latent tail folded in), the KDA
gated output norm, L2 norm.

Public entries (each runs the Triton kernel or the naive reference, `ops/dispatch.py`; the inference
kernels have no backward):
- `fused_rms_norm`: `rmsnorm.py` / `naive.naive_fused_rms_norm`; for the training forms (autograd, or
  autocast: `dispatch.training_forms`) on a kernel device a
  plain [N, D] norm, with or without the residual add, runs the differentiable training kernels
  (`rmsnorm_train.py`, whose output is in the autocast dtype under autocast), anything else the naive form;
- `fused_gated_rms_norm`: `gated_norm.py` / `naive.gated_rms_norm`; for the training forms on a kernel device the
  differentiable training kernel (`gated_norm_train.py`).
`rms_norm`, `gated_rms_norm` and `l2norm` are the references. The kernels are imported on first use:
importing the package never needs triton.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.dispatch import training_forms, use_kernel, use_triton
from kimi_linear.ops.norm.naive import gated_rms_norm, l2norm, naive_fused_rms_norm, rms_norm

__all__ = ["fused_rms_norm", "fused_gated_rms_norm", "rms_norm", "gated_rms_norm", "l2norm", "naive_fused_rms_norm"]


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   branch_weights: torch.Tensor | None = None, tail: int = 0,
                   scatter: tuple[torch.Tensor, torch.Tensor] | None = None):
    """RMSNorm of (branch + residual) over the last dim, in the reference's rounding order.

    x: [..., D + tail]; with `branch_weights` [N, k] x is [N, k, D] and the branch is their weighted sum.
    weight: [D]. residual: [N, D] in x's dtype or None. tail: trailing columns copied unchanged (not with
    residual / branch_weights). scatter: (dst [..., D + tail] contiguous, slots int [N]): each output row n
    is also stored at flat row slots[n] of dst (negative = skip).
    Returns y [..., D + tail] in promote(weight, x) dtype; with `residual` the pair (y, new residual stream).
    """
    if (branch_weights is None and not tail and scatter is None and x.dim() == 2 and use_triton(x)
            and training_forms(x, weight, residual)):
        from kimi_linear.ops.norm.rmsnorm_train import rms_norm_train

        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return rms_norm_train(x, weight, eps, residual=residual, out_dtype=out_dtype)
    if use_kernel(x, weight, residual, branch_weights):
        from kimi_linear.ops.norm.rmsnorm import fused_rms_norm as kernel

        return kernel(x, weight, eps, residual=residual, branch_weights=branch_weights, tail=tail, scatter=scatter)
    return naive_fused_rms_norm(x, weight, eps, residual, branch_weights, tail, scatter)


def fused_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA output norm: rmsnorm(x) * weight * sigmoid(gate) in fp32, cast to x's dtype.

    x, gate: [N, H, K] (unit last stride on the kernel path); weight: [K] shared by all heads.
    """
    if use_triton(x) and training_forms(x, gate, weight):
        from kimi_linear.ops.norm.gated_norm_train import gated_rms_norm_train

        return gated_rms_norm_train(x, gate, weight, eps)
    if use_kernel(x, gate, weight):
        from kimi_linear.ops.norm.gated_norm import fused_gated_rms_norm as kernel

        return kernel(x, gate, weight, eps)
    return gated_rms_norm(x, gate, weight, eps)
