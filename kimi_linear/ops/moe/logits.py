"""The router's fp32 logits x @ gate_weight^T with a lean backward (training).

`fp32_logits(x [N, D], gate_weight [E, D]) -> [N, E] fp32`: the product of the fp32 upcasts (the
reference's arithmetic, also under autocast), as an autograd Function that keeps x in its own dtype for
the backward (the eager `x.float() @ w.float().t()` keeps an fp32 copy of x, [N, D] x 4 bytes a layer)
and upcasts it again there: dx = (dlogits @ w) in x's dtype, dw = dlogits^T @ x in fp32.
"""

from __future__ import annotations

import torch


class _Fp32Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ w.float().t()

    @staticmethod
    def backward(ctx, dl):
        x, w = ctx.saved_tensors
        dl = dl.float()
        with torch.autocast(x.device.type, enabled=False):
            dx = (dl @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = (dl.t() @ x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def fp32_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or gate_weight.requires_grad) and x.dtype != torch.float32:
        return _Fp32Logits.apply(x, gate_weight)
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ gate_weight.float().t()
