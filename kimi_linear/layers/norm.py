"""RMSNorm module (decoder norms, final norm, MLA kv_a_layernorm) and its fused entry points.

- `norm(x)`: plain RMSNorm.
- `norm.add(branch, residual)`: the pre-norm decoder's "residual += branch; h = norm(residual)" in one
  kernel, returning (h, residual). `residual` None means `branch` is the stream itself (the first layer).
  `branch` may be a `(y [N, k, D], weights [N, k])` pair, the MoE's unreduced expert outputs: the
  weighted sum is folded into the same kernel.
- `norm.with_tail(x, tail, scatter)`: normalise the first D columns and copy the last `tail` unchanged (MLA
  latent), optionally storing the rows straight into the paged latent cache.

All three are `ops.norm.fused_rms_norm`: on CUDA without autograd its kernel (`ops/norm/rmsnorm.py`),
otherwise the naive form, in the reference order (the add rounds to the model dtype, then the norm).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.ops.norm import fused_rms_norm

Branch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def reduce_branch(branch: Branch) -> torch.Tensor:
    """A `(y [N, k, D], weights [N, k])` pair -> (sum_j w_j y_j in fp32).to(y.dtype); a tensor as is."""
    if isinstance(branch, tuple):
        y, w = branch
        return (y.float() * w.float()[..., None]).sum(1).to(y.dtype)
    return branch


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.weight, self.eps)

    def add(self, branch: Branch, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + branch), residual + branch); residual None: (norm(branch), branch)."""
        if residual is None:
            stream = reduce_branch(branch)
            return self(stream), stream
        if isinstance(branch, tuple):
            return fused_rms_norm(branch[0], self.weight, self.eps, residual=residual, branch_weights=branch[1])
        return fused_rms_norm(branch, self.weight, self.eps, residual=residual)

    def with_tail(self, x: torch.Tensor, tail: int,
                  scatter: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, D + tail] -> y = [norm(x[:, :D]) ; x[:, D:]]. With `scatter=(dst, slots)` row n of y is also
        stored at flat row slots[n] of dst (negative = skip)."""
        return fused_rms_norm(x, self.weight, self.eps, tail=tail, scatter=scatter)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
