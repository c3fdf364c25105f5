"""Reference FP8 (float8_e4m3fn) quantization: scales, quantize, dequantize and the dequantized GEMM.

Two weight layouts, both symmetric with fp32 scales (value = fp8 * scale):
- per output channel: w [N, K] fp8, scale [N, 1] (a per-tensor scale is the same one repeated);
- block-wise (DeepSeek-V3 / Kimi K2): scale [ceil(N / BN), ceil(K / BK)], one per BN x BK tile
  (`weight_scale_inv` in those checkpoints: despite the name, the factor the fp8 values are multiplied by).
Stacked expert weights [E, N, K] carry [E, N, 1] or [E, ceil(N / BN), ceil(K / BK)] scales.
Activations are quantized per token (row) on the fly: scale = amax(|x|) / 448.

`dequantize_fp8` is the oracle of every FP8 kernel; `naive_fp8_linear` (x @ dequantized w^T in x's
dtype) is what the CPU runs, so a quantized checkpoint on the CPU computes exactly what the dequantized
model computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_MIN = 1e-12  # an all-zero row gets this scale (its values stay 0), never 0 / 0


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """[..., ceil(N / BN), ceil(K / BK)] block scales -> [..., N, K] (one value per weight)."""
    N, K = shape[-2:]
    bn, bk = block
    s = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return s[..., :N, :K]


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype) -> (fp8 [..., N, K], fp32 scale): per output channel [..., N, 1]
    when `block` is None, else [..., ceil(N / BN), ceil(K / BK)]. Computed in fp32 on w's device."""
    wf = w.float()
    if block is None:
        scale = (wf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_MIN)
        return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    N, K = wf.shape[-2:]
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    pad = F.pad(wf, (0, kb * bk - K, 0, nb * bn - N))
    tiles = pad.view(*wf.shape[:-2], nb, bn, kb, bk)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(SCALE_MIN)  # [..., nb, kb]
    q = (wf / _expand_blocks(scale, wf.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [..., N, K] with its scale (see `quantize_fp8`) -> the values in `dtype` (computed in fp32)."""
    s = scale.float() if block is None else _expand_blocks(scale.float(), q.shape, block)
    return (q.float() * s).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scale [M, 1]): dynamic per-token activation quantization."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_MIN)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def naive_fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                     block: tuple[int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(w [N, K])^T in x's dtype -> [..., N]."""
    return F.linear(x, dequantize_fp8(w, scale, block, x.dtype))
