"""Differentiable causal depthwise conv1d (+ SiLU) over packed documents, in plain torch ops (training).

The same contract as `naive.naive_causal_conv1d` without a conv-state pool: x [T, C] holds the tokens
of N documents back to back (`cu_seqlens` [N + 1], None = one document), weight [C, W] (or [C, 1, W]),
column W - 1 multiplying the current token. Every document starts from a zero window: tap j of token t
reads token t - (W - 1) + j only when that token lies in t's document. Vectorised as W shifted
multiply-adds of the whole row with a per-token mask (no host loop over documents, no host sync), fp32
math, output in x's dtype; autograd gives the gradients of x and weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.errors import ConvError


def positions_in_documents(T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """int64 [T]: each token's offset from the start of its document."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = torch.searchsorted(cu[1:], t, right=True).clamp_max(cu.numel() - 2)
    return t - cu[doc]


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                         activation: str | None = "silu") -> torch.Tensor:
    if x.dim() != 2:
        raise ConvError(f"causal_conv1d_varlen: x must be [T, C], got {tuple(x.shape)}")
    T, C = x.shape
    W = weight.shape[-1]
    if weight.numel() != C * W:
        raise ConvError(f"causal_conv1d_varlen: weight {tuple(weight.shape)} does not match {C} channels")
    if activation not in (None, "silu"):
        raise ConvError(f"causal_conv1d_varlen: unsupported activation {activation!r}")
    w = weight.reshape(C, W).float()
    xf = x.float()
    pos = positions_in_documents(T, cu_seqlens, x.device)
    out = xf * w[:, W - 1]
    for s in range(1, min(W, T + 1)):
        shifted = F.pad(xf[:T - s], (0, 0, s, 0))  # row t holds x[t - s] (zeros above the first rows)
        out = out + torch.where((pos >= s)[:, None], shifted, 0.0) * w[:, W - 1 - s]
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
