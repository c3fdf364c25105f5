"""Differentiable MoE experts through torch's grouped GEMM (`torch._grouped_mm`): the training path.

Same result as `naive.naive_moe_experts` (y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x)), with
autograd through every step and no host synchronisation:
1. the P = N * k (token, slot) pairs are sorted by expert (stable); each expert's group of rows is
   padded to a multiple of ALIGN rows (the grouped GEMM's 16-byte alignment of group starts along the
   token dim, also in its weight-gradient GEMM) inside a buffer of the static bound
   R = P + E * (ALIGN - 1) rows; the last group also owns the slack rows at the end (zeros);
2. `_Dispatch`: the buffer is a gather of x rows (x cast to the compute dtype first), `_grouped_mm`
   runs the gate|up projection [R, 2I] per group, SiLU * up, then the down projection [R, D];
3. `_Combine`: each token gathers its k rows back, weighted in fp32 and summed, cast to x's dtype.
Both have their own backward made of gathers only (no atomics, no sort-based index_put): the gradient of
a buffer row is its pair's weight times its token's output gradient, a token's input gradient is the sum
of its k rows' gradients. Padding rows hold a copy of token 0's input (any finite value does): nothing
reads their outputs, so their gradients are zero and they add nothing to the weight gradients.
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
    pair_row = torch.empty(P, dtype=torch.int64, device=x.device)
    pair_row[order] = dest  # buffer row of pair (token t, slot j) at t * k + j
    row_tok = torch.zeros(R, dtype=torch.int64, device=x.device)
    row_tok[dest] = tok  # token of each buffer row (padding: token 0)
    with torch.autocast(x.device.type, enabled=False):
        xs = _Dispatch.apply(x.to(dtype), row_tok, pair_row.view(N, k))
        h = torch._grouped_mm(xs, w13.to(dtype).transpose(1, 2), offs=offs)  # [R, 2I]
        a = F.silu(h[:, :I]) * h[:, I:]
        y = torch._grouped_mm(a, w2.to(dtype).transpose(1, 2), offs=offs)  # [R, D]
        return _Combine.apply(y, topk_weights, pair_row.view(N, k), x.dtype)


class _Dispatch(torch.autograd.Function):
    """(x [N, D], row_tok [R], pair_row [N, k]) -> xs [R, D] = x[row_tok]; backward sums each token's k rows."""

    @staticmethod
    def forward(ctx, x, row_tok, pair_row):
        ctx.save_for_backward(pair_row)
        return x.index_select(0, row_tok)

    @staticmethod
    def backward(ctx, dxs):
        (pair_row,) = ctx.saved_tensors
        N, k = pair_row.shape
        rows = dxs.index_select(0, pair_row.reshape(-1)).view(N, k, -1)
        return rows.sum(1, dtype=torch.float32).to(dxs.dtype), None, None


class _Combine(torch.autograd.Function):
    """(y [R, D], weights [N, k], pair_row [N, k]) -> out [N, D] = sum_j weights[:, j] * y[pair_row[:, j]]
    (fp32 sum, stored in out_dtype)."""

    @staticmethod
    def forward(ctx, y, weights, pair_row, out_dtype):
        N, k = pair_row.shape
        yg = y.index_select(0, pair_row.reshape(-1)).view(N, k, -1)
        ctx.save_for_backward(y, weights, pair_row)
        return (yg.float() * weights.float()[..., None]).sum(1).to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        y, weights, pair_row = ctx.saved_tensors
        N, k = pair_row.shape
        R, D = y.shape
        dout = dout.contiguous()
        dy = None
        if ctx.needs_input_grad[0]:
            vals = (dout.float()[:, None, :] * weights.float()[..., None]).to(y.dtype)  # [N, k, D]
            dy = torch.zeros(R, D, dtype=y.dtype, device=y.device)
            dy.index_copy_(0, pair_row.reshape(-1), vals.view(N * k, D))  # rows are distinct: no accumulation
        dw = None
        if ctx.needs_input_grad[1]:
            yg = y.index_select(0, pair_row.reshape(-1)).view(N, k, D)
            dw = torch.bmm(yg, dout.to(y.dtype)[:, :, None]).squeeze(-1) if y.dtype != torch.float32 else \
                torch.bmm(yg, dout.float()[:, :, None]).squeeze(-1)
            dw = dw.to(weights.dtype)
        return dy, dw, None, None
