"""Differentiable MoE experts through torch's grouped GEMM (`torch._grouped_mm`): the training path.

Same result as `naive.naive_moe_experts` (y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x)), with
autograd through every step and no host synchronisation:
1. the P = N * k (token, slot) pairs are sorted by expert (stable); each expert's group of rows is
   padded to a multiple of ALIGN rows (the grouped GEMM's 16-byte alignment of group starts along the
   token dim, also in its weight-gradient GEMM) inside a buffer of the static bound
   R = P + E * (ALIGN - 1) rows; the last group also owns the slack rows at the end (zeros);
2. `_DispatchUp`: the buffer is a gather of x rows (x cast to the compute dtype first) and `_grouped_mm`
   runs the gate|up projection [R, 2I] per group (the buffer is gathered again in the backward rather
   than kept: k times the rows of x); SiLU * up, then the down projection [R, D];
3. `_DownCombine`: the down projection [R, D], then each token gathers its k rows back, weighted in
   fp32 and summed, cast to x's dtype.
Both have their own backward made of gathers only (no atomics, no sort-based index_put): the gradient of
a buffer row is its pair's weight times its token's output gradient, a token's input gradient is the sum
of its k rows' gradients. Neither [R, D] buffer (the gathered inputs, the expert outputs) is kept for the
backward; per token and layer the experts keep ~k * 3I values (h, silu(h), a) instead of ~k * 3D. Padding rows hold a copy of token 0's input (any finite value does): nothing
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
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))  # no sync
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
    row_w = torch.zeros(R, dtype=torch.float32, device=x.device)
    row_w[dest] = topk_weights.reshape(-1)[order].detach().float()  # routing weight of each row (padding: 0)
    with torch.autocast(x.device.type, enabled=False):
        h = _DispatchUp.apply(x.to(dtype), row_tok, pair_row.view(N, k), w13.to(dtype).transpose(1, 2), offs)
        a = F.silu(h[:, :I]) * h[:, I:]
        return _DownCombine.apply(a, w2.to(dtype).transpose(1, 2), offs, topk_weights, pair_row.view(N, k), row_tok,
                                  row_w, x.dtype)


class _DispatchUp(torch.autograd.Function):
    """(x [N, D], row_tok [R], pair_row [N, k], w13t [E, D, 2I], offs) -> h [R, 2I], the gate|up projection of
    the buffer xs = x[row_tok]. The buffer is not kept: the backward gathers it again from x (k times
    smaller), runs the grouped GEMM's own backward, and sums each token's k row gradients."""

    @staticmethod
    def forward(ctx, x, row_tok, pair_row, w13t, offs):
        ctx.save_for_backward(x, row_tok, pair_row, w13t, offs)
        return torch._grouped_mm(x.index_select(0, row_tok), w13t, offs=offs)

    @staticmethod
    def backward(ctx, dh):
        x, row_tok, pair_row, w13t, offs = ctx.saved_tensors
        N, k = pair_row.shape
        with torch.enable_grad():
            xs = x.detach().index_select(0, row_tok).requires_grad_()
            w = w13t.detach().requires_grad_(ctx.needs_input_grad[3])
            h = torch._grouped_mm(xs, w, offs=offs)
            leaves = (xs, w) if ctx.needs_input_grad[3] else (xs,)
            grads = torch.autograd.grad(h, leaves, dh)
        dxs = grads[0]
        rows = dxs.index_select(0, pair_row.reshape(-1)).view(N, k, -1)
        dx = rows.sum(1, dtype=torch.float32).to(x.dtype)
        return dx, None, None, grads[1] if ctx.needs_input_grad[3] else None, None


class _DownCombine(torch.autograd.Function):
    """(a [R, I], w2t [E, I, D], offs, weights [N, k], pair_row [N, k], row_tok [R], row_w [R]) -> out [N, D]:
    y = the grouped down projection of a, out[t] = sum_j weights[t, j] * y[pair_row[t, j]] (fp32 sum, stored
    in out_dtype). y [R, D] is not kept: with g = dout[row_tok] (each row's token's output gradient),
    du = g @ w2 gives both the routing-weight gradient <dout[t], y_row> = <du, a> per row and
    da = row_w * du; the weight gradient is the grouped GEMM's own backward for row_w * g (one more
    forward GEMM of a, recomputed for autograd)."""

    @staticmethod
    def forward(ctx, a, w2t, offs, weights, pair_row, row_tok, row_w, out_dtype):
        N, k = pair_row.shape
        y = torch._grouped_mm(a, w2t, offs=offs)  # [R, D]
        yg = y.index_select(0, pair_row.reshape(-1)).view(N, k, -1)
        ctx.save_for_backward(a, w2t, offs, weights, pair_row, row_tok, row_w)
        return (yg.float() * weights.float()[..., None]).sum(1).to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        a, w2t, offs, weights, pair_row, row_tok, row_w = ctx.saved_tensors
        g = dout.to(a.dtype).index_select(0, row_tok)  # [R, D]
        du = torch._grouped_mm(g, w2t.transpose(1, 2), offs=offs)  # [R, I]
        dweights = None
        if ctx.needs_input_grad[3]:
            per_row = (du.float() * a.float()).sum(-1)
            dweights = per_row.index_select(0, pair_row.reshape(-1)).view(pair_row.shape).to(weights.dtype)
        da = (du.float() * row_w[:, None]).to(a.dtype) if ctx.needs_input_grad[0] else None
        dw2t = None
        if ctx.needs_input_grad[1]:
            gs = (g.float() * row_w[:, None]).to(a.dtype)
            with torch.enable_grad():
                w = w2t.detach().requires_grad_()
                (dw2t,) = torch.autograd.grad(torch._grouped_mm(a.detach(), w, offs=offs), (w,), gs)
        return da, dw2t, None, dweights, None, None, None, None
