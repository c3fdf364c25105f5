"""The decoder's post-attention norm and the MoE router in one launch, for decode-sized batches (Triton).

    s = branch + residual (rounded to the stream's dtype)      h = RMSNorm(s)      logits = h @ gate_weight^T
    (topk_weights, topk_ids) = grouped top-k of sigmoid(logits) (+ bias)

The same results as `ops.norm.fused_rms_norm(branch, norm_weight, eps, residual)` followed by
`routing.fused_sigmoid_grouped_topk(h, ...)` at N <= GEMV_MAX_TOKENS, with two launches fewer per MoE
layer (the norm's and the top-k's: at batch 1 each is a few microseconds of latency, not of bytes):
- grid: the logits GEMV's column blocks (`routing.gemv_block_e`). Every program computes the norm of the N
  rows itself (`rmsnorm.rms_norm_of`, launched with `rmsnorm.launch_warps` warps: the same reduction order as
  the norm kernel, so h is that kernel's, bit for bit), program 0 stores h and the new residual, and each
  program multiplies its whole gate rows (fp32, exact products of bf16 values) with the rounded h;
- the last program to finish (an acq_rel counter, `quant.fp8_gemv.split_k_arrive`; the counter is left at
  0) runs the grouped top-k of each token over the logits the others wrote (`routing.topk_row`).
Logits: the same products as the router's GEMV kernel, summed in another order (warps): ids agree but for
exact ties of the fp32 sums. CUDA-graph capturable (no host sync, shape-only grid); launches on one device
must not run concurrently on two streams (the shared counter), as for the split-K GEMVs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MoEError
from kimi_linear.ops.moe.routing import GEMV_MAX_TOKENS, check_router_args, gemv_block_e, topk_constexprs, topk_row
from kimi_linear.ops.norm.rmsnorm import launch_warps, rms_norm_of
from kimi_linear.ops.quant.fp8_gemv import split_k_arrive, split_k_counters


@triton.jit
def _norm_router_kernel(x, r, nw, h_out, r_out, gw, logits, bias, weights, ids, count, N, sx_n, sr_n, eps, E, PER,
                        scaling, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                        NUM_PROGRAMS: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr,
                        NUM_SHARED: tl.constexpr, K_P: tl.constexpr, G_P: tl.constexpr, PER_P: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BIASED_WEIGHTS: tl.constexpr, RENORMALIZE: tl.constexpr):
    pid = tl.program_id(0)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < E
    w = tl.load(gw + cols.to(tl.int64)[:, None] * D + o[None, :], mask=cmask[:, None] & m[None, :],
                other=0.0).to(tl.float32)
    nwv = tl.load(nw + o, mask=m, other=0.0)  # with the router's tile, not after the norm's reduction
    first = pid == 0
    n = 0
    while n < N:
        v = tl.load(x + n * sx_n + o, mask=m, other=0.0)
        s = (v.to(tl.float32) + tl.load(r + n * sr_n + o, mask=m, other=0.0).to(tl.float32)).to(x.dtype.element_ty)
        h = rms_norm_of(s, nwv, eps, D).to(h_out.dtype.element_ty)
        tl.store(r_out + n * D + o, s, mask=m & first)
        tl.store(h_out + n * D + o, h, mask=m & first)
        tl.store(logits + n * E + cols, tl.sum(w * h.to(tl.float32)[None, :], 1), mask=cmask)
        n += 1
    if split_k_arrive(count, 0, NUM_PROGRAMS):
        KT: tl.constexpr = TOPK + NUM_SHARED
        n = 0
        while n < N:
            topk_row(logits + n * E, bias, weights + n * KT, ids + n * KT, E, PER, scaling, G, TOPK_GROUP, TOPK,
                     NUM_SHARED, K_P, G_P, PER_P, HAS_BIAS, BIASED_WEIGHTS, RENORMALIZE)
            n += 1


def fused_norm_select_experts(branch: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                              num_expert_group: int = 1, topk_group: int = 1, renormalize: bool = True,
                              scaling: float = 1.0, biased_weights: bool = False, num_shared: int = 0):
    """branch, residual [N, D] (N <= GEMV_MAX_TOKENS, one dtype, unit last stride); norm_weight [D]; the
    router's arguments as `routing.fused_sigmoid_grouped_topk` -> (h [N, D] in promote(norm_weight, branch),
    new residual [N, D], topk_weights [N, k + S] fp32, topk_ids [N, k + S] int64)."""
    N, D = branch.shape if branch.dim() == 2 else (-1, -1)
    if branch.dim() != 2 or not 0 <= N <= GEMV_MAX_TOKENS:
        raise MoEError(f"norm + router: branch must be [N <= {GEMV_MAX_TOKENS}, D], got {tuple(branch.shape)}")
    if residual.shape != branch.shape or residual.dtype != branch.dtype or norm_weight.shape != (D,):
        raise MoEError(f"norm + router: residual {tuple(residual.shape)} {residual.dtype} and norm weight "
                       f"{tuple(norm_weight.shape)} must match branch [N, D={D}] {branch.dtype}")
    check_router_args(branch, gate_weight, bias, top_k, num_expert_group, topk_group, num_shared)
    branch = branch if branch.stride(-1) == 1 else branch.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    gate_weight = gate_weight.contiguous()
    E = gate_weight.shape[0]
    dev = branch.device
    h = torch.empty(N, D, dtype=torch.promote_types(norm_weight.dtype, branch.dtype), device=dev)
    r_out = torch.empty(N, D, dtype=branch.dtype, device=dev)
    weights = torch.empty(N, top_k + num_shared, dtype=torch.float32, device=dev)
    ids = torch.empty(N, top_k + num_shared, dtype=torch.int64, device=dev)
    if N == 0:
        return h, r_out, weights, ids
    logits = torch.empty(N, E, dtype=torch.float32, device=dev)
    block_d, block_e = gemv_block_e(D)
    programs = triton.cdiv(E, block_e)
    b = bias.contiguous() if bias is not None else logits
    _norm_router_kernel[(programs,)](
        branch, residual, norm_weight, h, r_out, gate_weight, logits, b, weights, ids, split_k_counters(dev, 1),
        N, branch.stride(0), residual.stride(0), float(eps), E, E // num_expert_group, float(scaling),
        D=D, BLOCK_D=block_d, BLOCK_E=block_e, NUM_PROGRAMS=programs,
        **topk_constexprs(E, top_k, num_expert_group, topk_group, renormalize, biased_weights, num_shared,
                          bias is not None),
        num_warps=launch_warps(block_d))
    return h, r_out, weights, ids
