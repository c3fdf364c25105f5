"""FP8 (float8_e4m3fn) weights: quantize, dequantize, and the FP8-weight linear layer's GEMM.

Public entries (`ops/dispatch.py` picks the implementation):
- `fp8_linear(x, w, scale, block)`: x [..., K] @ (w [N, K] fp8 * scale)^T in x's dtype. CUDA: per-channel
  weights with more than `SMALL_M` rows of x take `torch._scaled_mm` (x quantized per token, FP8 tensor
  cores, `scaled_mm.py`); up to `fp8_gemv.GEMV_MAX_M` rows (decode) the Triton GEMV (`fp8_gemv.py`: fp8
  weight tiles reduced with tl.sum, split-K for narrow N); other small M and block scales the Triton MMA
  kernel (`fp8_gemm.py`: fp8 weight bytes, upcast in registers). Both Triton kernels are weight-only. CPU:
  the dequantized GEMM (`naive.naive_fp8_linear`), i.e. exactly the dequantized model. No path syncs with
  the host. A fast path that fails on this GPU / library version falls back once, with a warning
  (`fallback.py`: a failing GEMV falls back to the MMA kernel, a failing MMA kernel to the naive GEMM).
- `quantize_fp8`, `dequantize_fp8`, `quantize_per_token`: the references (`naive.py`), also used at load.
Weights never need autograd here (inference only); under autograd the naive form runs.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.dispatch import needs_grad, use_triton
from kimi_linear.ops.quant.naive import (
    FP8,
    FP8_MAX,
    dequantize_fp8,
    naive_fp8_linear,
    quantize_fp8,
    quantize_per_token,
)

__all__ = ["fp8_linear", "quantize_fp8", "dequantize_fp8", "quantize_per_token", "naive_fp8_linear", "FP8",
           "FP8_MAX", "SMALL_M"]

SMALL_M = 16  # rows of x up to which the weight-streaming Triton kernel beats _scaled_mm's tiles


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ (w [N, K] float8_e4m3fn * scale)^T -> [..., N] in x's dtype.

    scale: fp32 [N, 1] per output channel (block None) or [ceil(N / BN), ceil(K / BK)] for block (BN, BK)."""
    if not use_triton(x) or needs_grad(x):
        return naive_fp8_linear(x, w, scale, block)
    from kimi_linear.ops.quant.fallback import first_try
    from kimi_linear.ops.quant.fp8_gemm import fp8_gemm, use_gemv

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = (*shape[:-1], w.shape[0])
    if block is None and x2.shape[0] > SMALL_M and x2.is_cuda:
        from kimi_linear.ops.quant import scaled_mm

        if scaled_mm.supported(x2, w):
            return first_try("scaled_mm", lambda: scaled_mm.scaled_mm_linear(x2, w, scale),
                             lambda: fp8_gemm(x2, w, scale, block)).view(out)
    def triton_path():
        if use_gemv(x2):
            return first_try("fp8_gemv", lambda: fp8_gemm(x2, w, scale, block, gemv=True),
                             lambda: fp8_gemm(x2, w, scale, block, gemv=False))
        return fp8_gemm(x2, w, scale, block, gemv=False)

    return first_try("fp8_gemm", triton_path, lambda: naive_fp8_linear(x2, w, scale, block)).view(out)
