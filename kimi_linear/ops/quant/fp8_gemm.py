"""FP8-weight GEMM on the GPU (Triton): y [M, N] = x [M, K] @ (w_fp8 [N, K] * scale)^T, bf16/fp16/fp32 x.

The weight tile is loaded as fp8 (1 byte per value: the bytes a decode step moves) and upcast in
registers to x's dtype (exact: every e4m3 value is a bf16 value); the MMA runs in x's dtype with fp32
accumulation. Scales:
- per output channel (scale [N, 1]): applied once to the accumulator at the end;
- block-wise (scale [ceil(N / BN_s), ceil(K / BK_s)]): each K tile lies inside one scale block
  (BLOCK_K divides BK_s), so the tile's partial product is scaled by its block's value as it is added.
No host sync and a grid fixed by shapes: CUDA-graph capturable. Used for small M and for block scales at any
M; large-M per-channel GEMMs take `torch._scaled_mm` (`scaled_mm.py`). On CUDA, M <= GEMV_MAX_M rows (decode:
a GEMV that is all weight bytes) take the GEMV kernel instead (`fp8_gemv.py`: tl.sum over weight tiles, split-K),
unless `gemv=False`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import QuantError
from kimi_linear.ops.quant.fp8_gemv import GEMV_MAX_M, fp8_gemv


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, s_xm, s_ym, s_sn,
                     SBN: tl.constexpr, SBK: tl.constexpr, BLOCK_SCALE: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm = offs_m < M
    mn = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mk = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mk[:, None] & mn[None, :], other=0.0).to(a.dtype)
        if BLOCK_SCALE:
            s = tl.load(s_ptr + (offs_n // SBN) * s_sn + k0 // SBK, mask=mn, other=0.0)
            acc += tl.dot(a, b, input_precision=PREC) * s[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not BLOCK_SCALE:
        acc = acc * tl.load(s_ptr + offs_n * s_sn, mask=mn, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def _tiles(M: int, N: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): narrow N tiles for GEMVs (many programs stream the
    weight)."""
    if M <= 16:
        return 16, 32 if N >= 4096 else 16, 256, 4, 3
    if M <= 64:
        return 64, 64, 128, 4, 3
    return 128, 128, 64, 8, 3


def use_gemv(x: torch.Tensor) -> bool:
    """Whether `fp8_gemm(gemv=None)` takes the GEMV kernel for x [M, K]: CUDA and M <= GEMV_MAX_M."""
    return x.is_cuda and 0 < x.shape[0] <= GEMV_MAX_M


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
             tiles: tuple[int, int, int, int, int] | None = None, gemv: bool | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride) @ (w [N, K] fp8 * scale)^T -> y [M, N] in x's dtype.
    scale: fp32 [N, 1] (per channel) or [ceil(N / BN), ceil(K / BK)] for block = (BN, BK).
    gemv: True forces the GEMV kernel (`fp8_gemv.py`, M <= 16), False this file's MMA kernel; None picks the
    GEMV where `use_gemv(x)` holds and no tiles are given. tiles overrides the chosen kernel's tile rule:
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the MMA kernel (`_tiles`), (BLOCK_N, BLOCK_K,
    SPLIT_K, num_warps, num_stages) for the GEMV (`fp8_gemv.gemv_tiles`) (tile sweeps: benchmarks/fp8_tiles.py)."""
    if gemv is None:
        gemv = tiles is None and use_gemv(x)
    if gemv:
        return fp8_gemv(x, w, scale, block, tiles)
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or w.dtype != torch.float8_e4m3fn or not w.is_contiguous():
        raise QuantError(f"fp8_gemm: need a contiguous float8_e4m3fn weight [N, K={K}], got {w.dtype} {tuple(w.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale = scale if scale.dtype == torch.float32 else scale.float()
    bm, bn, bk, warps, stages = tiles or _tiles(M, N)
    if block is None:
        if tuple(scale.shape) != (N, 1):
            raise QuantError(f"fp8_gemm: per-channel scale must be [{N}, 1], got {tuple(scale.shape)}")
        sbn, sbk, s_sn = 1, 1, scale.stride(0)
    else:
        sbn, sbk = block
        if tuple(scale.shape) != (-(-N // sbn), -(-K // sbk)):
            raise QuantError(f"fp8_gemm: block scale must be [{-(-N // sbn)}, {-(-K // sbk)}], got {tuple(scale.shape)}")
        if scale.stride(1) != 1:
            scale = scale.contiguous()
        while bk > sbk or sbk % bk:
            bk //= 2
        bk = max(bk, 16)
        if sbk % bk:
            raise QuantError(f"fp8_gemm: block width {sbk} must be a multiple of 16")
        s_sn = scale.stride(0)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _fp8_gemm_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
        x, w, scale, y, M, N, K, x.stride(0), y.stride(0), s_sn,
        SBN=sbn, SBK=sbk, BLOCK_SCALE=block is not None, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return y
