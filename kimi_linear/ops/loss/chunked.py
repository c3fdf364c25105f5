"""Chunked linear + cross-entropy with its own backward: the [tokens, vocab] logits never exist whole.

`ChunkedLinearCrossEntropy` (an autograd Function) takes the final hidden states [N, D], the output
projection [V, D] and the targets [N] (`ignore_index` = no loss). Only the rows with a target are used
(one host sync to find them). They are processed `chunk` rows at a time: the chunk's logits
[chunk, V] are computed in the compute dtype (the autocast dtype when autocast is on, else the
inputs' dtype) and upcast to fp32, the log-sum-exp and the target logit give the chunk's loss, and the
gradients are formed right away from softmax - onehot (in place, fp32, then in the compute dtype):
d_hidden = d_logits @ W and d_weight += d_logits^T @ hidden (each chunk's product in the compute dtype,
the sum over chunks in fp32). The forward thus does all the
matmuls that a forward plus backward would (3 x N x D x V), stores d_hidden [N, D] and d_weight [V, D]
(only for the inputs that need them) instead of the logits, and the backward scales them by the
incoming gradient. Peak extra memory is two [chunk, V] buffers.
On a kernel device (CUDA) the chunk's cross-entropy and softmax - onehot run as one Triton launch in
place on the compute-dtype logits (`softmax_grad.py`; no fp32 copy, so the chunk holds twice the rows
in the same bytes), and each chunk's d_weight product accumulates straight into the fp32 sum
(`torch.addmm(out_dtype=float32)`, falling back to product-then-add where torch lacks it).
"""

from __future__ import annotations

import torch

from kimi_linear.errors import OpError
from kimi_linear.ops.dispatch import use_triton

# Rows per chunk: the fp32 logits of one chunk take about this many bytes (2 GiB at 4096 x 163840 x 4
# would be too much; 256 MiB gives ~400 rows at the real vocabulary).
CHUNK_BYTES = 256 << 20
MIN_CHUNK, MAX_CHUNK = 16, 8192


def default_chunk(vocab_size: int) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_BYTES // (4 * max(vocab_size, 1))))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for t's device, else t's own."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise OpError(f"linear_cross_entropy: hidden must be [N, D] and weight [V, D]; got hidden "
                      f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise OpError(f"linear_cross_entropy: labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise OpError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")


_ADDMM_FP32: list[bool] = []  # whether torch.addmm(out_dtype=float32) serves bf16 operands here (tried once)


def _accumulate(dw: torch.Tensor, d: torch.Tensor, hc: torch.Tensor) -> torch.Tensor:
    """dw (fp32) + d^T @ hc, the product in the compute dtype of d and hc with fp32 accumulation."""
    if d.dtype == torch.float32:
        return dw.addmm_(d.t(), hc)
    if dw.is_cuda and _ADDMM_FP32 != [False]:
        try:  # one GEMM that reads and writes dw in fp32 (no bf16 product, no fp32 copy of it, no add)
            with torch.autocast(dw.device.type, enabled=False):  # never let autocast cast the fp32 sum
                out = torch.addmm(dw, d.t(), hc, out_dtype=torch.float32)
            if not _ADDMM_FP32:
                _ADDMM_FP32.append(True)
            return out
        except (RuntimeError, TypeError):
            _ADDMM_FP32[:] = [False]
    return dw.add_((d.t() @ hc).float())


def _chunks(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, dtype: torch.dtype,
            grad_h: bool, grad_w: bool):
    """Loss sum and (d_hidden [n, D] in dtype, d_weight [V, D] fp32) of the rows h [n, D] with targets y."""
    n = h.shape[0]
    wc = w.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty(n, h.shape[1], dtype=dtype, device=h.device) if grad_h else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grad_w else None
    kernel = (grad_h or grad_w) and use_triton(h)
    if kernel:  # the chunk's logits exist only in the compute dtype: twice the rows in the same bytes
        from kimi_linear.ops.loss.softmax_grad import softmax_xent_

        chunk = chunk * 4 // torch.empty((), dtype=dtype).element_size()
    for s in range(0, n, chunk):
        hc = h[s:s + chunk].to(dtype)
        yc = y[s:s + chunk]
        if kernel:
            d = hc @ wc.t()  # [c, V] in the compute dtype, overwritten with softmax - onehot
            loss += softmax_xent_(d, yc).sum()
        else:
            logits = (hc @ wc.t()).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if not (grad_h or grad_w):
                continue
            d = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            d[torch.arange(d.shape[0], device=d.device), yc] -= 1.0
            d = d.to(dtype)
        if grad_h:
            dh[s:s + chunk] = d @ wc
        if grad_w:
            dw = _accumulate(dw, d, hc)
    return loss, dh, dw


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], labels [N]) -> (loss_sum fp32, num_tokens int64); see the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int, dtype: torch.dtype):
        valid = labels != ignore_index
        rows = valid.nonzero().squeeze(1)  # host sync: the number of targets
        num = torch.tensor(rows.numel(), dtype=torch.int64, device=hidden.device)
        y = labels[rows].long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
            raise OpError(f"linear_cross_entropy: target ids must lie in [0, {weight.shape[0]}) or be "
                          f"{ignore_index}; got values in [{int(y.min())}, {int(y.max())}]")
        grad_h, grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh_rows, dw = _chunks(hidden[rows], weight, y, chunk, dtype, grad_h, grad_w)
        dh = None
        if grad_h:
            dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            dh.index_copy_(0, rows, dh_rows.to(hidden.dtype))
        ctx.save_for_backward(dh, dw.to(weight.dtype) if dw is not None else None)
        ctx.mark_non_differentiable(num)
        return loss, num

    @staticmethod
    def backward(ctx, grad_loss, grad_num):
        dh, dw = ctx.saved_tensors
        g = grad_loss.float()
        return (dh * g.to(dh.dtype) if dh is not None else None,
                dw * g.to(dw.dtype) if dw is not None else None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = -100, chunk: int | None = None):
    """hidden [N, D], weight [V, D], labels int [N] -> (loss_sum fp32 scalar, num_tokens int64 scalar)."""
    check_inputs(hidden, weight, labels)
    chunk = chunk or default_chunk(weight.shape[0])
    if chunk < 1:
        raise OpError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    dtype = compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk, dtype)
    with torch.no_grad():
        return ChunkedLinearCrossEntropy.forward(_NoGradCtx(), hidden, weight, labels, ignore_index, chunk, dtype)


class _NoGradCtx:
    """Stands in for the autograd ctx when nothing needs a gradient (eval): no gradients are formed."""

    needs_input_grad = (False, False, False, False, False, False)

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
