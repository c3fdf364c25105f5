"""Differentiable MoE experts through torch's grouped GEMM (`torch._grouped_mm`): the training path.

Same result as `naive.naive_moe_experts` (y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x)), with
autograd through every step and no host synchronisation:
1. the P = N * k (token, slot) pairs are sorted by expert (stable); each expert's group of rows is
   padded to a multiple of ALIGN rows (the grouped GEMM's 16-byte alignment of group starts along the
   token dim, also in its weight-gradient GEMM) inside a buffer of the static bound
   R = P + E * (ALIGN - 1) rows; the last group also owns the slack rows at the end (zeros);
2. x rows are scattered into the buffer, `_grouped_mm` runs the gate|up projection [R, 2I] per group,
   SiLU * up, then the down projection [R, D];
3. each pair's row is gathered back, weighted in fp32 and summed per token (index_add), cast to x's dtype.
Padding rows are zero inputs: their outputs are zero and they add nothing to the weight gradients.
The GEMMs run in the compute dtype (autocast's when on, else x's); `grouped_supported` says when the
CUDA kernel applies (bf16, rows of a multiple of 8 values); otherwise callers take the expert loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.errors import MoEError

ALIGN = 16


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the CUDA grouped GEMM serves these shapes: bf16 compute, D and I multiples of 8."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and compute_dtype(x) == torch.bfloat16
            and x.shape[-1] % 8 == 0 and w2.shape[-1] % 8 == 0)


def grouped_moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """x [N, D], w13 [E, 2I, D], w2 [E, D, I], topk_weights [N, k], topk_ids [N, k] in [0, E) -> y [N, D]."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or w13.shape[2] != x.shape[1] \
            or w2.shape[1] != x.shape[1] or w13.shape[1] != 2 * w2.shape[2] or topk_ids.shape != topk_weights.shape:
        raise MoEError(f"grouped_moe_experts: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
                       f"topk {tuple(topk_ids.shape)} / {tuple(topk_weights.shape)} do not fit together")
    N, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    P = N * k
    dtype = compute_dtype(x)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    expert = flat[order]
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    pad_end = padded.cumsum(0)
    R = P + E * (ALIGN - 1)
    rank = torch.arange(P, device=x.device) - (counts.cumsum(0) - counts)[expert]
    dest = (pad_end - padded)[expert] + rank  # buffer row of each sorted pair
    offs = torch.cat([pad_end[:-1], pad_end.new_full((1,), R)]).to(torch.int32)
    tok = order // k
    with torch.autocast(x.device.type, enabled=False):
        xs = x.new_zeros(R, D, dtype=dtype).index_put((dest,), x[tok].to(dtype))
        h = torch._grouped_mm(xs, w13.to(dtype).transpose(1, 2), offs=offs)  # [R, 2I]
        a = F.silu(h[:, :I]) * h[:, I:]
        y = torch._grouped_mm(a, w2.to(dtype).transpose(1, 2), offs=offs)  # [R, D]
        w = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(N, D, dtype=torch.float32, device=x.device).index_add(0, tok, y[dest].float() * w[:, None])
    return out.to(x.dtype)
