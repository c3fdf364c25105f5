"""FP8 fused-MoE direct mode as GEMVs (Triton): the decode path's up and down projections of each (token,
slot) pair, reading only the fp8 bytes of the pair's expert.

Direct mode (`fused_moe.py`, P = N * k <= DIRECT_MAX_PAIRS pairs) gives every pair one row; for FP8 weights
weight-only (x never quantized), these kernels replace its MMA kernels on CUDA (`fused_moe(gemv=)`):
- up (`_moe_gemv_up_kernel`): h[p] = silu(x[t] w1[e]^T) * (x[t] w3[e]^T), gate and up [BLOCK_N, BLOCK_K] fp8
  tiles of the same columns upcast to fp32 in registers, multiplied by x's row and reduced with `tl.sum`
  along K (no MMA), fp32 accumulation, h stored in x's dtype [P, I];
- down (`_moe_gemv_down_kernel`): y[p] = h[p] w2[e]^T the same way, stored unweighted in x's dtype [P, D].
Same numerics as the MMA kernels' weight-only path (exact products of e4m3 and bf16/fp16 values in fp32, fp32
sums): only the summation order differs. Scales per output row (applied once to the final sums) or per
block (BLOCK_K divides the block width: each tile's partial sum scaled as it is added).
Grid (column blocks, pairs, SPLIT_K): split-K, for a few pairs (too few column blocks to fill the SMs), sums
K ranges in separate programs through fp32 partials and the last-arriver reduction of `ops/quant/fp8_gemv.py`
(deterministic; silu applied after the full sum). Duplicate experts are read once per pair, as in direct
mode. No host sync, grid and buffers fixed by shapes: CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MoEError
from kimi_linear.ops.quant.fp8_gemv import (block_k_for, sm_count, split_k_arrive, split_k_counters, split_k_for,
                                             split_k_sum)


@dataclass(frozen=True)
class MoEGemvTiles:
    """Tile sizes of the direct-mode GEMVs: `up` / `down` = (block_n, block_k, split_k, num_warps, num_stages)."""

    up: tuple[int, int, int, int, int]
    down: tuple[int, int, int, int, int]


def gemv_tiles(num_pairs: int, D: int, I: int, block_k_max: int = 512, num_sms: int = 132) -> MoEGemvTiles:
    """The rule of `ops/quant/fp8_gemv.py`: 16-row tiles up to 512 fp8 bytes wide dividing K (the up kernel reads
    two per step, gate and up), split-K where the pairs' column blocks are too few for 4 programs per SM."""
    bk_up, bk_down = block_k_for(D, block_k_max), block_k_for(I, block_k_max)
    up = (16, bk_up, split_k_for(num_pairs * triton.cdiv(I, 16), triton.cdiv(D, bk_up), num_sms), 4, 2)
    down = (16, bk_down, split_k_for(num_pairs * triton.cdiv(D, 16), triton.cdiv(I, bk_down), num_sms), 4, 2)
    return MoEGemvTiles(up, down)


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _moe_gemv_up_kernel(x_ptr, w13_ptr, h_ptr, ids_ptr, s_ptr, part_ptr, count_ptr, s_se, s_sn, P, K_SPLIT,
                        D: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                        BLOCK_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    tok = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, D)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    wg_ptrs = w13_ptr + e * 2 * I * D + offs_n.to(tl.int64)[:, None] * D + offs_k[None, :]
    wu_ptrs = wg_ptrs + I * D
    x_row = x_ptr + tok * D
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:  # no K mask: 16-byte vector loads
            xr = tl.load(x_row + offs_k)
            g = tl.load(wg_ptrs, mask=mn[:, None], other=0.0)
            u = tl.load(wu_ptrs, mask=mn[:, None], other=0.0)
        else:
            mk = offs_k < k_hi
            xr = tl.load(x_row + offs_k, mask=mk, other=0.0)
            g = tl.load(wg_ptrs, mask=mn[:, None] & mk[None, :], other=0.0)
            u = tl.load(wu_ptrs, mask=mn[:, None] & mk[None, :], other=0.0)
        xf = xr.to(tl.float32)[None, :]
        pg = tl.sum(g.to(tl.float32) * xf, axis=1)
        pu = tl.sum(u.to(tl.float32) * xf, axis=1)
        if BLOCK_SCALE:  # this K tile lies in one scale block column
            s_row = s_ptr + e * s_se + k0 // SBK
            pg = pg * tl.load(s_row + (offs_n // SBN) * s_sn, mask=mn, other=0.0)
            pu = pu * tl.load(s_row + ((I + offs_n) // SBN) * s_sn, mask=mn, other=0.0)
        acc_g += pg
        acc_u += pu
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
        offs_k += BLOCK_K
    if SPLIT_K > 1:  # partials [SPLIT_K, 2, P, I]
        offs_p = pair * I + offs_n
        tl.store(part_ptr + pid_k * 2 * P * I + offs_p, acc_g, mask=mn)
        tl.store(part_ptr + (pid_k * 2 + 1) * P * I + offs_p, acc_u, mask=mn)
        last = split_k_arrive(count_ptr, pair * tl.num_programs(0) + pid_n, SPLIT_K)
        acc_g = split_k_sum(part_ptr, offs_p, mn, 2 * P * I, last, SPLIT_K)
        acc_u = split_k_sum(part_ptr + P * I, offs_p, mn, 2 * P * I, last, SPLIT_K)
        mn = mn & last
    if not BLOCK_SCALE:
        s_row = s_ptr + e * s_se
        acc_g = acc_g * tl.load(s_row + offs_n * s_sn, mask=mn, other=0.0)
        acc_u = acc_u * tl.load(s_row + (I + offs_n) * s_sn, mask=mn, other=0.0)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + pair.to(tl.int64) * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _moe_gemv_down_kernel(h_ptr, w2_ptr, y_ptr, ids_ptr, s_ptr, part_ptr, count_ptr, s_se, s_sn, P, K_SPLIT,
                          D: tl.constexpr, I: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                          BLOCK_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < D
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, I)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w_ptrs = w2_ptr + e * D * I + offs_n.to(tl.int64)[:, None] * I + offs_k[None, :]
    h_row = h_ptr + pair.to(tl.int64) * I
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            hr = tl.load(h_row + offs_k)
            w = tl.load(w_ptrs, mask=mn[:, None], other=0.0)
        else:
            mk = offs_k < k_hi
            hr = tl.load(h_row + offs_k, mask=mk, other=0.0)
            w = tl.load(w_ptrs, mask=mn[:, None] & mk[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * hr.to(tl.float32)[None, :], axis=1)
        if BLOCK_SCALE:
            part = part * tl.load(s_ptr + e * s_se + (offs_n // SBN) * s_sn + k0 // SBK, mask=mn, other=0.0)
        acc += part
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    if SPLIT_K > 1:  # partials [SPLIT_K, P, D]
        offs_p = pair * D + offs_n
        tl.store(part_ptr + pid_k * P * D + offs_p, acc, mask=mn)
        last = split_k_arrive(count_ptr, pair * tl.num_programs(0) + pid_n, SPLIT_K)
        acc = split_k_sum(part_ptr, offs_p, mn, P * D, last, SPLIT_K)
        mn = mn & last
    if not BLOCK_SCALE:
        acc = acc * tl.load(s_ptr + e * s_se + offs_n * s_sn, mask=mn, other=0.0)
    tl.store(y_ptr + pair.to(tl.int64) * D + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mn)


# ---------------------------------------------------------------------------------------------- launch
def _k_split(K: int, bk: int, split: int) -> tuple[int, int]:
    """(K range per split, a multiple of bk; the number of splits) for at most `split` splits."""
    k_tiles = triton.cdiv(K, bk)
    k_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles))) * bk
    return k_split, triton.cdiv(K, k_split)


def scale_tile_k(bk: int, block: tuple[int, int] | None) -> int:
    """BLOCK_K halved until it divides the scale block width (a K tile never straddles two scale blocks); the
    MMA kernels of `fused_moe.py` use it too."""
    if block is None:
        return bk
    while bk > 16 and (bk > block[1] or block[1] % bk):
        bk //= 2
    if block[1] % bk:
        raise MoEError(f"fused_moe: the scale block width {block[1]} must be a multiple of 16")
    return bk


def moe_gemv_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                   w13_scale: torch.Tensor, w2_scale: torch.Tensor, block: tuple[int, int] | None,
                   tiles: MoEGemvTiles | None = None) -> torch.Tensor:
    """The unweighted pair outputs y [P = N * k, D] in x's dtype: y[p] = w2[e] (silu(w1[e] x[t]) * w3[e] x[t]),
    e = topk_ids[p // k, p % k], t = p // k. x [N, D] contiguous; w13 [E, 2I, D], w2 [E, D, I] fp8 contiguous
    with `fused_moe`'s scales (checked there); topk_ids [N, k] contiguous. tiles overrides `gemv_tiles`."""
    N, D = x.shape
    I = w2.shape[2]
    k = topk_ids.shape[1]
    P = N * k
    dev = x.device
    t = tiles or gemv_tiles(P, D, I, block[1] if block is not None else 512, sm_count(dev))
    sbn, sbk = block if block is not None else (1, 1)
    flags = dict(SBN=sbn, SBK=sbk, BLOCK_SCALE=block is not None)

    h = torch.empty(P, I, dtype=x.dtype, device=dev)
    bn, bk, split, warps, stages = t.up
    bk = scale_tile_k(bk, block)
    k_split, split = _k_split(D, bk, split)
    num_n = triton.cdiv(I, bn)
    part = torch.empty(split, 2, P, I, dtype=torch.float32, device=dev) if split > 1 else h
    count = split_k_counters(dev, P * num_n) if split > 1 else h
    _moe_gemv_up_kernel[(num_n, P, split)](
        x, w13, h, topk_ids, w13_scale, part, count, w13_scale.stride(0), w13_scale.stride(1), P, k_split, D, I,
        TOPK=k, SPLIT_K=split, EVEN_K=D % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        **flags)

    y = torch.empty(P, D, dtype=x.dtype, device=dev)
    bn, bk, split, warps, stages = t.down
    bk = scale_tile_k(bk, block)
    k_split, split = _k_split(I, bk, split)
    num_n = triton.cdiv(D, bn)
    part = torch.empty(split, P, D, dtype=torch.float32, device=dev) if split > 1 else y
    count = split_k_counters(dev, P * num_n) if split > 1 else y
    _moe_gemv_down_kernel[(num_n, P, split)](
        h, w2, y, topk_ids, w2_scale, part, count, w2_scale.stride(0), w2_scale.stride(1), P, k_split, D, I,
        SPLIT_K=split, EVEN_K=I % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **flags)
    return y
