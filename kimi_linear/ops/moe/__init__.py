"""Mixture of experts: sigmoid router with correction bias and grouped top-k; SwiGLU experts.

Public entries (each runs the Triton kernel or the naive reference, `ops/dispatch.py`; the kernels have
no backward, so under autograd the naive forms run; both never sync with the host on the kernel path):
- `select_experts`: the router (`routing.py` / `naive.sigmoid_grouped_topk`);
- `norm_select_experts`: the decoder's post-attention residual add + RMSNorm and the router, in one launch
  for decode-sized batches on the kernel path (`norm_router.py`), else `ops.norm.fused_rms_norm` then
  `select_experts`;
- `fused_experts`: the routed experts, plus shared experts folded into the stacks (`fused_moe.py` /
  `naive.naive_fused_experts`). Under autograd: torch's differentiable grouped GEMM
  (`grouped.grouped_moe_experts`) where it serves (CUDA, bf16 compute), else the naive expert loop.
FP8 expert stacks (float8_e4m3fn with fp32 scales) take `fused_experts(..., w13_scale=, w2_scale=, block=)`:
the kernel reads the fp8 bytes, the naive path runs the dequantized experts.
`sigmoid_grouped_topk` and `naive_moe_experts` are the references; `router_scores` (the fp32 sigmoid
scores, also under autocast) feeds the training balance loss. The kernels are imported on first use:
importing the package never needs triton.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.dispatch import training_forms, use_kernel
from kimi_linear.ops.moe.grouped import grouped_moe_experts, grouped_supported
from kimi_linear.ops.moe.naive import naive_fused_experts, naive_moe_experts, router_scores, sigmoid_grouped_topk
from kimi_linear.ops.norm import fused_rms_norm

__all__ = ["select_experts", "norm_select_experts", "fused_experts", "router_scores", "grouped_moe_experts",
           "grouped_supported", "sigmoid_grouped_topk", "naive_moe_experts", "naive_fused_experts"]


def select_experts(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                   num_expert_group: int = 1, topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0,
                   biased_weights: bool = False, num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], gate_weight [E, D], bias [E] or None -> (topk_weights [N, k + S] fp32, topk_ids [N, k + S]
    int64). num_shared = S > 0 appends S shared-expert slots (ids E .. E + S - 1, weight 1.0). The kernel
    path lists the routed ids best first (the reference leaves them unsorted)."""
    args = (x, gate_weight, bias, top_k, num_expert_group, topk_group, renormalize, scaling, biased_weights)
    if use_kernel(x, gate_weight, bias):
        from kimi_linear.ops.moe.routing import fused_sigmoid_grouped_topk as kernel

        return kernel(*args, num_shared=num_shared)
    return sigmoid_grouped_topk(*args, num_shared=num_shared)


def norm_select_experts(branch: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_expert_group: int = 1,
                        topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0,
                        biased_weights: bool = False, num_shared: int = 0):
    """h = RMSNorm(residual + branch) and the router on h: branch, residual [N, D] -> (h, new residual,
    topk_weights [N, k + S] fp32, topk_ids [N, k + S] int64); the norm as `ops.norm.fused_rms_norm`, the
    router as `select_experts`. Up to `routing.GEMV_MAX_TOKENS` tokens on the kernel path: one launch."""
    route = (top_k, num_expert_group, topk_group, renormalize, scaling, biased_weights)
    if branch.dim() == 2 and use_kernel(branch, residual, norm_weight, gate_weight, bias):
        from kimi_linear.ops.moe.routing import GEMV_MAX_TOKENS

        if branch.shape[0] <= GEMV_MAX_TOKENS:
            from kimi_linear.ops.moe.norm_router import fused_norm_select_experts as kernel

            return kernel(branch, residual, norm_weight, eps, gate_weight, bias, *route, num_shared=num_shared)
    h, residual = fused_rms_norm(branch, norm_weight, eps, residual=residual)
    return (h, residual, *select_experts(h, gate_weight, bias, *route, num_shared=num_shared))


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, num_shared: int = 0, reduce: bool = True,
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  block: tuple[int, int] | None = None):
    """SwiGLU experts. x [N, D]; w13 [E, 2I, D] (rows: gate w1, then up w3); w2 [E, D, I]; topk_weights
    [N, k] fp32; topk_ids [N, k] in [0, E) -> y [N, D] in x's dtype.

    num_shared = S: the last S experts of the stacks are shared experts, routed in the last S columns with
    weight 1.0 (`select_experts(num_shared=S)`): the kernel sums them with the routed ones in fp32 and rounds
    once; the naive form adds them after rounding the routed sum (the reference order, one ulp apart).
    reduce=False lets the kernel path skip the weighted k-way sum and return the pair (y [N, k, D]
    unweighted, topk_weights), for the next norm to sum (`ops.norm.fused_rms_norm`'s branch_weights); the
    naive path always returns y.
    FP8 stacks (w13, w2 float8_e4m3fn) come with their fp32 scales: [E, 2I, 1] / [E, D, 1] per output row,
    or block scales [E, 2I / BN, ceil(D / BK)] / [E, D / BN, ceil(I / BK)] for block = (BN, BK). The kernel
    reads the fp8 bytes (`fused_moe.py`); the naive path runs the dequantized experts in x's dtype.
    """
    if w13.dtype == torch.float8_e4m3fn:
        if use_kernel(x, topk_weights):
            from kimi_linear.ops.moe.fused_moe import fused_moe as kernel

            return kernel(x, w13, w2, topk_weights, topk_ids, reduce=reduce, w13_scale=w13_scale,
                          w2_scale=w2_scale, block=block)
        from kimi_linear.ops.quant import dequantize_fp8

        w13 = dequantize_fp8(w13, w13_scale, block, x.dtype)
        w2 = dequantize_fp8(w2, w2_scale, block, x.dtype)
        return naive_fused_experts(x, w13, w2, topk_weights, topk_ids, num_shared)
    if training_forms(x, w13, w2, topk_weights) and grouped_supported(x, w13, w2):
        k = topk_ids.shape[1] - num_shared
        y = grouped_moe_experts(x, w13, w2, topk_weights[:, :k], topk_ids[:, :k])
        return naive_fused_experts(x, w13, w2, topk_weights, topk_ids, num_shared, routed=y)
    if use_kernel(x, w13, w2, topk_weights):
        from kimi_linear.ops.moe.fused_moe import fused_moe as kernel

        return kernel(x, w13, w2, topk_weights, topk_ids, reduce=reduce)
    return naive_fused_experts(x, w13, w2, topk_weights, topk_ids, num_shared)
