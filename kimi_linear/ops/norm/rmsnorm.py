"""Fused RMSNorm (Triton): the residual add, or a weighted k-way branch sum, folded into the norm.

Same arithmetic, in the same order, as the reference (`naive.rms_norm`, spec section 2):

    s = branch + residual                      rounded to x's dtype (the decoder's residual stream)
    y = weight * (float(s) * rsqrt(mean(float(s)^2) + eps)).to(x.dtype)   the product in promote(weight, x)

- `residual` None: s = x (a plain RMSNorm).
- `branch_weights` [N, k]: x is [N, k, D] and the branch is (sum_j w[:, j] * float(x[:, j])).to(x.dtype),
  the MoE's weighted expert sum (as `fused_moe`'s sum kernel computes it), so that sum costs no launch.
- `tail` > 0: the last `tail` columns of each x row are copied to y unchanged (the MLA latent
  [kv_a_layernorm(c) ; k_pe] in one launch).
- `scatter=(dst, slots)`: each output row n is also stored at row slots[n] of dst (skipped when the slot
  is negative): the MLA latent goes straight into the paged cache, with no separate write launch.

One program per row; the row stays in registers (D up to 16K). Only the reduction order (and the
hardware rsqrt) differ from torch, so bf16 results match up to rare one-ulp flips. No autograd: callers
use the naive ops when gradients are needed. CUDA-graph safe (no host sync, shape-only grid).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import NormError



@triton.jit
def rms_norm_of(v, wv, eps, D: tl.constexpr):
    """weight * (float(v) * rsqrt(mean(float(v)^2) + eps)).to(v's dtype), fp32 (the caller rounds): one row
    v [BLOCK_D] in the stream's dtype, masked lanes zero; `wv` the weight's lanes, loaded by the caller
    before the row (its load then overlaps the row's instead of following the reduction's barrier: one
    memory latency less per launch). Shared with the kernels that fold a norm into their prologue
    (`ops/moe/norm_router.py`), which launch with `launch_warps` so that their sum of squares reduces in the
    same order as this module's kernel."""
    xf = v.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    yn = (xf * rstd).to(v.dtype).to(tl.float32)
    return yn * wv.to(tl.float32)


@triton.jit
def _rms_norm_kernel(x, r, bw, w, y, r_out, dst, slots, sx_n, sx_k, sr_n, sy_n, sro_n, eps,
                     D: tl.constexpr, TAIL: tl.constexpr, TOPK: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_T: tl.constexpr, HAS_RES: tl.constexpr, HAS_BW: tl.constexpr, SCATTER: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    if SCATTER:
        slot = tl.load(slots + n).to(tl.int64)
        p_dst = dst + tl.maximum(slot, 0) * (D + TAIL)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    wv = tl.load(w + o, mask=m, other=0.0)  # first: its latency overlaps the row's loads
    if HAS_BW:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            wj = tl.load(bw + n * TOPK + j).to(tl.float32)
            acc += wj * tl.load(x + n * sx_n + j * sx_k + o, mask=m, other=0.0).to(tl.float32)
        v = acc.to(x.dtype.element_ty)
    else:
        v = tl.load(x + n * sx_n + o, mask=m, other=0.0)
    if HAS_RES:
        s = (v.to(tl.float32) + tl.load(r + n * sr_n + o, mask=m, other=0.0).to(tl.float32)).to(x.dtype.element_ty)
        tl.store(r_out + n * sro_n + o, s, mask=m)
        v = s
    out = rms_norm_of(v, wv, eps, D).to(y.dtype.element_ty)
    tl.store(y + n * sy_n + o, out, mask=m)
    if SCATTER:
        # through fp32: exact for a bf16 cache, one rounding (RNE, saturating) for an fp8 one
        tl.store(p_dst + o, out.to(tl.float32).to(dst.dtype.element_ty), mask=m & (slot >= 0))
    if TAIL > 0:
        ot = tl.arange(0, BLOCK_T)
        mt = ot < TAIL
        t = tl.load(x + n * sx_n + D + ot, mask=mt, other=0.0).to(y.dtype.element_ty)
        tl.store(y + n * sy_n + D + ot, t, mask=mt)
        if SCATTER:
            tl.store(p_dst + D + ot, t.to(tl.float32).to(dst.dtype.element_ty), mask=mt & (slot >= 0))


def launch_warps(block: int) -> int:
    """Warps of a launch whose programs each normalise [block]-lane rows."""
    return max(1, min(8, block // 512))


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   branch_weights: torch.Tensor | None = None, tail: int = 0,
                   scatter: tuple[torch.Tensor, torch.Tensor] | None = None):
    """RMSNorm of (x + residual) over the last dim, with the options of the module docstring.

    Args:
        x: [..., D + tail] (unit last stride, any row stride); with `branch_weights`, [N, k, D].
        weight: [D].
        residual: [N, D] in x's dtype, or None.
        branch_weights: [N, k] (any float dtype, read as fp32), or None.
        tail: trailing columns of x copied unchanged (not with residual / branch_weights).
        scatter: (dst [..., D + tail] with contiguous rows, e.g. the paged latent cache [NB, BS, D + tail];
            slots int [N] flat row indices, negative = skip): y rows are stored there too.
    Returns:
        y [..., D + tail] in promote(weight, x) dtype; with `residual` the pair (y, s) where s [N, D] is
        the new residual stream (x's dtype).
    """
    D = weight.shape[-1]
    if weight.dim() != 1:
        raise NormError(f"fused_rms_norm: weight must be [D], got {tuple(weight.shape)}")
    if tail < 0 or (tail and (residual is not None or branch_weights is not None)):
        raise NormError("fused_rms_norm: tail must be >= 0 and cannot be combined with residual / branch_weights")
    if branch_weights is not None:
        if x.dim() != 3 or x.shape[-1] != D or branch_weights.shape != x.shape[:2]:
            raise NormError(f"fused_rms_norm: with branch_weights x must be [N, k, D={D}] and the weights [N, k]; "
                             f"got x {tuple(x.shape)}, weights {tuple(branch_weights.shape)}")
        lead = x.shape[:1]
        x2 = x if x.stride(-1) == 1 else x.contiguous()
        topk, sx_k = x.shape[1], x2.stride(1)
        branch_weights = branch_weights.contiguous()
    else:
        if x.shape[-1] != D + tail:
            raise NormError(f"fused_rms_norm: x has {x.shape[-1]} columns, expected D + tail = {D} + {tail}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, D + tail)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        topk, sx_k = 1, 0
    N = x2.shape[0]
    y = torch.empty(*lead, D + tail, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    r_out = None
    if residual is not None:
        if residual.shape != (N, D) or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise NormError(f"fused_rms_norm: residual must be [N={N}, D={D}] in {x.dtype} with a unit last "
                             f"stride, got {tuple(residual.shape)} {residual.dtype}")
        r_out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    dst = slots = y
    if scatter is not None:
        dst, slots = scatter
        if dst.shape[-1] != D + tail or not dst.is_contiguous() or slots.shape != (N,):
            raise NormError(f"fused_rms_norm: scatter needs a contiguous [..., {D + tail}] destination and "
                             f"[N={N}] slots; got {tuple(dst.shape)} and {tuple(slots.shape)}")
    if N:
        block_d = triton.next_power_of_2(D)
        _rms_norm_kernel[(N,)](
            x2, residual if residual is not None else x2, branch_weights if branch_weights is not None else x2,
            weight, y, r_out if r_out is not None else y, dst, slots,
            x2.stride(0), sx_k, residual.stride(0) if residual is not None else 0, D + tail,
            D if r_out is not None else 0, float(eps),
            D=D, TAIL=tail, TOPK=topk, BLOCK_D=block_d, BLOCK_T=triton.next_power_of_2(max(tail, 1)),
            HAS_RES=residual is not None, HAS_BW=branch_weights is not None, SCATTER=scatter is not None,
            num_warps=launch_warps(block_d))
    return y if residual is None else (y, r_out)
