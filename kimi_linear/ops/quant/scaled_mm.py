"""FP8 x FP8 GEMM through `torch._scaled_mm` (cuBLASLt / CUTLASS row-wise scaling on Hopper).

y [M, N] = (x_fp8 * sx) @ (w_fp8 * sw)^T with x quantized per token on the fly (sx [M, 1] fp32) and the
weight's per-output-channel scale (sw [N, 1] fp32, passed as [1, N]); bf16 output. The weight is a
row-major [N, K] tensor, so `w.t()` is the column-major [K, N] operand the call needs (no copy). The
activation quantization is three elementwise torch ops (no host sync), so the path is CUDA-graph
capturable. Requires K and N multiples of 16 (`supported`).
"""

from __future__ import annotations

import torch

from kimi_linear.ops.quant.naive import quantize_per_token


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `scaled_mm_linear` serves these operands (CUDA, bf16 x, dims multiples of 16)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and w.shape[0] % 16 == 0
            and hasattr(torch, "_scaled_mm"))


def scaled_mm_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16, w [N, K] fp8 row-major, scale [N, 1] fp32 -> y [M, N] bf16."""
    xq, sx = quantize_per_token(x)
    return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=scale.view(1, -1), out_dtype=x.dtype)
