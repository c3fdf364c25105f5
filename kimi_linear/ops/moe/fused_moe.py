"""Fused MoE experts on the GPU (Triton): y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x).

Same result as `naive.naive_moe_experts`, with no host synchronisation: every grid depends only on
N, k, E and the tile sizes, so a decode step that calls this can be captured in a CUDA graph.

Pairs: the P = N * k (token, slot) pairs, pair p = token p // k, slot p % k, expert topk_ids[p].
1. align (`_align_*`): a counting sort of the pairs by expert. Each expert's group of rows is padded
   to a multiple of BLOCK_M, so a row tile never straddles two experts.
     sorted_pairs int32 [R]: the pair of each sorted row, R = P + min(P, E) * (BLOCK_M - 1) bounds
       the padded total from shapes alone; padding rows are never read nor written.
     expert_start int32 [E + 1]: first padded row of each expert; expert_start[E] = rows in use.
     expert_count int32 [E]: pairs routed to each expert.
   P <= SINGLE_PROGRAM_MAX_PAIRS (decode, small batches): one program does it all (one launch);
   otherwise three launches (rank with atomics, scan, scatter) over many programs.
2. up (`_moe_up_kernel`): h[r] = silu(x[t] w1^T) * (x[t] w3^T) per sorted row, gate and up tiles of
   the same columns in one program, fp32 accumulation, h stored in x's dtype [R, I].
3. down (`_moe_down_kernel`): y[p] = h[r] w2^T, fp32 accumulation, stored in x's dtype at the pair's
   position [P, D], unweighted (the reference also rounds each expert's output to x's dtype).
4. sum (`_moe_sum_kernel`): out[t] = sum_j topk_weights[t, j] * y[t * k + j] in fp32, cast to x's dtype.
Row tiles past expert_start[E] exit at once. Expert ids must lie in [0, E) (not checked: that needs a sync).
Direct mode (P <= DIRECT_MAX_PAIRS, the decode case): no align launch; row tile p is pair p alone, its
expert read from topk_ids[p], h and y indexed by pair (duplicate experts are read once per pair).
`reduce=False` returns the unweighted [N, k, D] pair outputs instead of launching the sum.
FP8 stacks (float8_e4m3fn w13 / w2 with fp32 scales per output row or per block, `fused_moe(w13_scale=,
w2_scale=, block=)`): the GEMM kernels read the fp8 bytes. Weight-only (decode, direct mode): each weight
tile is upcast in registers to x's dtype and the per-row scales multiply the accumulator at the end (block
scales: each K tile's partial product, BLOCK_K dividing the block width). FP8 x FP8 (prefill): x and h are
quantized per token first (`_per_token_fp8`, torch ops, no sync) and the per-token scales join the weight
scales on the accumulator. If the FP8 x FP8 kernels cannot be compiled here, weight-only serves instead
(`ops/quant/fallback.py`, logged once). FP8 weight-only direct mode on CUDA runs GEMV kernels instead of the
up / down MMA kernels (`fused_moe_gemv.py`: tl.sum over fp8 weight tiles, split-K for few pairs; `gemv=`
forces either; if they cannot be compiled here, the MMA kernels serve, logged once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MoEError
from kimi_linear.ops.moe.fused_moe_gemv import MoEGemvTiles, moe_gemv_pairs, scale_tile_k
from kimi_linear.ops.quant.naive import quantize_per_token

SINGLE_PROGRAM_MAX_PAIRS = 4096
_ALIGN_BLOCK = 1024
DIRECT_MAX_PAIRS = 16


@dataclass(frozen=True)
class MoETiles:
    """Tile sizes. `up` / `down`: (block_n, block_k, num_warps, num_stages) of each grouped GEMM."""

    block_m: int
    up: tuple[int, int, int, int]
    down: tuple[int, int, int, int]
    group_m: int = 1


def pick_tiles(num_pairs: int, num_experts: int) -> MoETiles:
    """Tiles by the mean rows per expert: GEMV-like tiles for decode, wgmma-sized tiles for prefill."""
    rows = num_pairs / num_experts
    if rows <= 16:
        return MoETiles(16, (64, 128, 4, 4), (64, 128, 4, 4), 1)
    if rows <= 48:
        return MoETiles(32, (64, 128, 4, 4), (64, 128, 4, 4), 4)
    if rows <= 192:
        return MoETiles(64, (64, 128, 4, 3), (128, 64, 4, 4), 8)
    return MoETiles(128, (128, 64, 8, 3), (128, 64, 8, 4), 8)


# Direct mode (decode): one row tile per pair. Narrow up tiles and 3 stages keep every program resident
# at once (9 pairs x 32 tiles = 288 programs, 3 per SM), so no second wave of heavy programs trails.
DIRECT_TILES = MoETiles(16, (32, 128, 4, 3), (64, 128, 4, 3), 1)


# ---------------------------------------------------------------------------------------------- align
@triton.jit
def _rank_chunk(ids_ptr, count_ptr, rank_ptr, start, P, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    m = offs < P
    ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    rank = tl.atomic_add(count_ptr + ids, 1, mask=m)
    tl.store(rank_ptr + offs, rank, mask=m)


@triton.jit
def _scan(count_ptr, start_ptr, E, BLOCK_M: tl.constexpr, E_P: tl.constexpr):
    e = tl.arange(0, E_P)
    em = e < E
    count = tl.load(count_ptr + e, mask=em, other=0, cache_modifier=".cg")  # from L2, where the atomics land
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(start_ptr + e, ends - padded, mask=em)
    tl.store(start_ptr + E, tl.sum(padded, axis=0))


@triton.jit
def _scatter_chunk(ids_ptr, rank_ptr, start_ptr, sorted_ptr, start, P, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    m = offs < P
    ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    rank = tl.load(rank_ptr + offs, mask=m, other=0, cache_modifier=".cg")
    row = tl.load(start_ptr + ids, mask=m, other=0, cache_modifier=".cg") + rank
    tl.store(sorted_ptr + row, offs, mask=m)


@triton.jit
def _align_single_kernel(ids_ptr, count_ptr, rank_ptr, start_ptr, sorted_ptr, P, E,
                         BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, E_P: tl.constexpr):
    e = tl.arange(0, E_P)
    tl.store(count_ptr + e, tl.zeros([E_P], dtype=tl.int32), mask=e < E)
    tl.debug_barrier()
    c = 0
    while c < P:  # a while loop: runtime bounds (the interpreter cannot index `range` by a runtime scalar)
        _rank_chunk(ids_ptr, count_ptr, rank_ptr, c, P, BLOCK)
        c += BLOCK
    tl.debug_barrier()
    _scan(count_ptr, start_ptr, E, BLOCK_M, E_P)
    tl.debug_barrier()
    c = 0
    while c < P:
        _scatter_chunk(ids_ptr, rank_ptr, start_ptr, sorted_ptr, c, P, BLOCK)
        c += BLOCK


@triton.jit
def _align_rank_kernel(ids_ptr, count_ptr, rank_ptr, P, BLOCK: tl.constexpr):
    _rank_chunk(ids_ptr, count_ptr, rank_ptr, tl.program_id(0) * BLOCK, P, BLOCK)


@triton.jit
def _align_scan_kernel(count_ptr, start_ptr, E, BLOCK_M: tl.constexpr, E_P: tl.constexpr):
    _scan(count_ptr, start_ptr, E, BLOCK_M, E_P)


@triton.jit
def _align_scatter_kernel(ids_ptr, rank_ptr, start_ptr, sorted_ptr, P, BLOCK: tl.constexpr):
    _scatter_chunk(ids_ptr, rank_ptr, start_ptr, sorted_ptr, tl.program_id(0) * BLOCK, P, BLOCK)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """topk_ids [N, k] -> (sorted_pairs int32 [R], expert_start int32 [E + 1], expert_count int32 [E])."""
    P = topk_ids.numel()
    E = num_experts
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    R = P + min(P, E) * (block_m - 1)
    sorted_pairs = torch.empty(R, dtype=torch.int32, device=dev)
    start = torch.empty(E + 1, dtype=torch.int32, device=dev)
    rank = torch.empty(P, dtype=torch.int32, device=dev)
    E_P = triton.next_power_of_2(E)
    if P <= SINGLE_PROGRAM_MAX_PAIRS:
        count = torch.empty(E, dtype=torch.int32, device=dev)
        block = min(_ALIGN_BLOCK, max(128, triton.next_power_of_2(P)))  # >= 4 warps: no replicated atomics
        _align_single_kernel[(1,)](ids, count, rank, start, sorted_pairs, P, E, BLOCK_M=block_m, BLOCK=block,
                                   E_P=E_P, num_warps=4)
    else:
        count = torch.zeros(E, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(P, _ALIGN_BLOCK),)
        _align_rank_kernel[grid](ids, count, rank, P, BLOCK=_ALIGN_BLOCK, num_warps=4)
        _align_scan_kernel[(1,)](count, start, E, BLOCK_M=block_m, E_P=E_P, num_warps=4)
        _align_scatter_kernel[grid](ids, rank, start, sorted_pairs, P, BLOCK=_ALIGN_BLOCK, num_warps=4)
    return sorted_pairs, start, count


# ------------------------------------------------------------------------------------------- GEMMs
@triton.jit
def _tile_coords(num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles side by side for weight reuse in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _tile_rows(start_ptr, count_ptr, row0, E, BLOCK_M: tl.constexpr, E_P: tl.constexpr):
    """Expert of the row tile at row0 (the first expert whose padded end lies past row0), its rows, mask."""
    e_offs = tl.arange(0, E_P)
    ends = tl.load(start_ptr + 1 + e_offs, mask=e_offs < E, other=2147483647)
    e = tl.sum((ends <= row0).to(tl.int32), axis=0)
    valid_end = tl.load(start_ptr + e) + tl.load(count_ptr + e)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < valid_end


@triton.jit
def _moe_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, start_ptr, count_ptr, ids_ptr, s_ptr, xs_ptr, s_se, s_sn,
                   num_m, E, D: tl.constexpr,
                   I: tl.constexpr, TOPK: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   E_P: tl.constexpr, DIRECT: tl.constexpr, W_FP8: tl.constexpr = False, A_FP8: tl.constexpr = False,
                   BLOCK_SCALE: tl.constexpr = False, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1):
    if DIRECT:
        num_n = tl.cdiv(I, BLOCK_N)
        pid_m = tl.program_id(0) // num_n
        pid_n = tl.program_id(0) % num_n
        e = tl.load(ids_ptr + pid_m).to(tl.int32)
        rows = pid_m + tl.arange(0, BLOCK_M)
        rmask = tl.arange(0, BLOCK_M) == 0
        pair = rows
    else:
        pid_m, pid_n = _tile_coords(num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
        row0 = pid_m * BLOCK_M
        if row0 >= tl.load(start_ptr + E):
            return
        e, rows, rmask = _tile_rows(start_ptr, count_ptr, row0, E, BLOCK_M, E_P)
        pair = tl.load(sorted_ptr + rows, mask=rmask, other=0)
    tok = (pair // TOPK).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < I
    x_ptrs = x_ptr + tok[:, None] * D + offs_k[None, :]
    wg_ptrs = w13_ptr + e.to(tl.int64) * 2 * I * D + offs_n[None, :].to(tl.int64) * D + offs_k[:, None]
    wu_ptrs = wg_ptrs + I * D
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
            if EVEN_N:
                bg = tl.load(wg_ptrs)
                bu = tl.load(wu_ptrs)
            else:
                bg = tl.load(wg_ptrs, mask=nmask[None, :], other=0.0)
                bu = tl.load(wu_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = (k0 + offs_k) < D
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(wg_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            bu = tl.load(wu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if W_FP8 and not A_FP8:  # fp8 weight bytes, upcast in registers (exact)
            bg = bg.to(a.dtype)
            bu = bu.to(a.dtype)
        if BLOCK_SCALE:  # this K tile lies in one scale block: scale its partial product
            s_row = s_ptr + e.to(tl.int64) * s_se + k0 // SBK
            sg = tl.load(s_row + (offs_n // SBN) * s_sn, mask=nmask, other=0.0)
            su = tl.load(s_row + ((I + offs_n) // SBN) * s_sn, mask=nmask, other=0.0)
            acc_g += tl.dot(a, bg, input_precision=PREC) * sg[None, :]
            acc_u += tl.dot(a, bu, input_precision=PREC) * su[None, :]
        else:
            acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    if W_FP8 and not BLOCK_SCALE:  # per-channel weight scales
        s_row = s_ptr + e.to(tl.int64) * s_se
        acc_g = acc_g * tl.load(s_row + offs_n * s_sn, mask=nmask, other=0.0)[None, :]
        acc_u = acc_u * tl.load(s_row + (I + offs_n) * s_sn, mask=nmask, other=0.0)[None, :]
    if A_FP8:  # per-token activation scales
        xs = tl.load(xs_ptr + tok, mask=rmask, other=0.0)
        acc_g = acc_g * xs[:, None]
        acc_u = acc_u * xs[:, None]
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, w2_ptr, y_ptr, sorted_ptr, start_ptr, count_ptr, ids_ptr, s_ptr, hs_ptr, s_se, s_sn,
                     num_m, E, D: tl.constexpr,
                     I: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     E_P: tl.constexpr, DIRECT: tl.constexpr, W_FP8: tl.constexpr = False, A_FP8: tl.constexpr = False,
                     BLOCK_SCALE: tl.constexpr = False, SBN: tl.constexpr = 1, SBK: tl.constexpr = 1):
    if DIRECT:
        num_n = tl.cdiv(D, BLOCK_N)
        pid_m = tl.program_id(0) // num_n
        pid_n = tl.program_id(0) % num_n
        e = tl.load(ids_ptr + pid_m).to(tl.int32)
        rows = pid_m + tl.arange(0, BLOCK_M)
        rmask = tl.arange(0, BLOCK_M) == 0
        pair = rows.to(tl.int64)
    else:
        pid_m, pid_n = _tile_coords(num_m, tl.cdiv(D, BLOCK_N), GROUP_M)
        row0 = pid_m * BLOCK_M
        if row0 >= tl.load(start_ptr + E):
            return
        e, rows, rmask = _tile_rows(start_ptr, count_ptr, row0, E, BLOCK_M, E_P)
        pair = tl.load(sorted_ptr + rows, mask=rmask, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < D
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + offs_k[None, :]
    w_ptrs = w2_ptr + e.to(tl.int64) * D * I + offs_n[None, :].to(tl.int64) * I + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs, mask=rmask[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = (k0 + offs_k) < I
            a = tl.load(h_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if W_FP8 and not A_FP8:
            b = b.to(a.dtype)
        if BLOCK_SCALE:
            sw = tl.load(s_ptr + e.to(tl.int64) * s_se + (offs_n // SBN) * s_sn + k0 // SBK, mask=nmask, other=0.0)
            acc += tl.dot(a, b, input_precision=PREC) * sw[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if W_FP8 and not BLOCK_SCALE:
        acc = acc * tl.load(s_ptr + e.to(tl.int64) * s_se + offs_n * s_sn, mask=nmask, other=0.0)[None, :]
    if A_FP8:
        acc = acc * tl.load(hs_ptr + rows, mask=rmask, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None] * D + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, w_ptr, out_ptr, D: tl.constexpr, TOPK: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(w_ptr + t * TOPK + j).to(tl.float32)
        acc += w * tl.load(y_ptr + (t * TOPK + j) * D + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, acc.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------ FP8 helpers
def _fp8_launch(w_fp8: bool, a_fp8: bool, block: tuple[int, int] | None) -> dict:
    """The FP8 constexprs of the GEMM kernels."""
    if not w_fp8:
        return {}
    sbn, sbk = block if block is not None else (1, 1)
    return dict(W_FP8=True, A_FP8=a_fp8, BLOCK_SCALE=block is not None, SBN=sbn, SBK=sbk)


def _per_token_fp8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [R, K] -> (fp8 [R, K], fp32 scale [R]): `ops.quant.quantize_per_token` (torch ops, no host sync)."""
    q, scale = quantize_per_token(a)
    return q, scale.view(-1)


# ------------------------------------------------------------------------------------------ public op
def _check(x, w13, w2, topk_weights, topk_ids):
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise MoEError(f"fused_moe: expected x [N, D], w13 [E, 2I, D], w2 [E, D, I]; got x {tuple(x.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    N, D = x.shape
    E, I2, D13 = w13.shape
    if D13 != D or I2 % 2 or tuple(w2.shape) != (E, D, I2 // 2):
        raise MoEError(f"fused_moe: shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, D]), "
                         f"w2 {tuple(w2.shape)} (want [E, D, I])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_weights.shape != topk_ids.shape:
        raise MoEError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [N={N}, k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise MoEError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    fp8 = w13.dtype == torch.float8_e4m3fn
    if not (x.dtype == w13.dtype == w2.dtype or (fp8 and w2.dtype == w13.dtype and x.dtype != w13.dtype)):
        raise MoEError(f"fused_moe: x, w13 and w2 must share a dtype (or w13, w2 both float8_e4m3fn), got "
                       f"{x.dtype}, {w13.dtype}, {w2.dtype}")
    if len({t.device for t in (x, w13, w2, topk_weights, topk_ids)}) != 1:
        raise MoEError("fused_moe: all tensors must be on one device")


def _check_scales(w13, w2, w13_scale, w2_scale, block):
    E, I2, D = w13.shape
    I = I2 // 2
    if block is None:
        want13, want2 = (E, I2, 1), (E, D, 1)
    else:
        bn, bk = block
        if I % bn or D % bn:
            raise MoEError(f"fused_moe: block scales need I = {I} and D = {D} to be multiples of the block height {bn}")
        want13, want2 = (E, I2 // bn, -(-D // bk)), (E, D // bn, -(-I // bk))
    for name, s, want in (("w13_scale", w13_scale, want13), ("w2_scale", w2_scale, want2)):
        if s is None or tuple(s.shape) != want or s.dtype != torch.float32 or s.stride(-1) != 1:
            got = None if s is None else (s.dtype, tuple(s.shape))
            raise MoEError(f"fused_moe: fp8 weights need {name} fp32 {list(want)} with a unit last stride, got {got}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, tiles: MoETiles | None = None, reduce: bool = True,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block: tuple[int, int] | None = None, act_fp8: bool | None = None,
              direct_tiles: MoETiles | MoEGemvTiles | None = None, gemv: bool | None = None):
    """Routed SwiGLU experts.

    x [N, D]; w13 [E, 2I, D] (rows: gate w1, then up w3); w2 [E, D, I]; topk_weights [N, k] (fp32);
    topk_ids [N, k] int32/int64 in [0, E) -> y [N, D] in x's dtype. `tiles` overrides `pick_tiles`.
    reduce=False skips the weighted k-way sum and returns (y_pairs [N, k, D] unweighted, topk_weights), for a
    consumer that folds the sum into its own kernel (`ops/norm/rmsnorm.py`'s branch_weights).

    FP8 weights (w13, w2 float8_e4m3fn): w13_scale / w2_scale fp32 [E, 2I, 1] / [E, D, 1] per output row,
    or [E, 2I / BN, ceil(D / BK)] / [E, D / BN, ceil(I / BK)] for block = (BN, BK). act_fp8: quantize the
    activations per token (x before the up GEMM, h before the down GEMM) and run FP8 x FP8 MMAs; False
    upcasts the weight tiles in registers and keeps x's dtype (weight bytes are what decode moves: the
    default for direct mode, where the quantization launches would cost more than they save).
    gemv: FP8 weight-only direct mode's kernels: True the GEMVs (`fused_moe_gemv.py`), False the MMA kernels,
    None the GEMVs on CUDA unless direct_tiles is a MoETiles. direct_tiles overrides, in direct mode, DIRECT_TILES (MoETiles, MMA kernels) or
    `fused_moe_gemv.gemv_tiles` (MoEGemvTiles, GEMVs) (tile sweeps: benchmarks/fp8_tiles.py).
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    w_fp8 = w13.dtype == torch.float8_e4m3fn
    if w_fp8:
        _check_scales(w13, w2, w13_scale, w2_scale, block)
    N, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    if N == 0 or k == 0:
        if not reduce:
            return torch.zeros(N, k, D, dtype=x.dtype, device=x.device), topk_weights
        return torch.zeros(N, D, dtype=x.dtype, device=x.device)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()
    P = N * k
    direct = tiles is None and P <= DIRECT_MAX_PAIRS
    a_fp8 = w_fp8 and (not direct if act_fp8 is None else act_fp8)
    can_gemv = direct and w_fp8 and not a_fp8
    if gemv and not can_gemv:
        raise MoEError("fused_moe: gemv=True needs direct mode (no tiles, N * k <= DIRECT_MAX_PAIRS) and FP8 "
                       "weights without act_fp8")
    if gemv or (gemv is None and can_gemv and x.is_cuda and not isinstance(direct_tiles, MoETiles)):
        if direct_tiles is not None and not isinstance(direct_tiles, MoEGemvTiles):
            raise MoEError(f"fused_moe: the GEMVs take MoEGemvTiles, got {type(direct_tiles).__name__}")

        def run_gemv():
            return _reduce(moe_gemv_pairs(x, w13, w2, topk_ids, w13_scale, w2_scale, block, direct_tiles),
                           topk_weights, N, k, D, reduce)

        if gemv:
            return run_gemv()
        from kimi_linear.ops.quant.fallback import first_try

        return first_try("fused_moe_gemv", run_gemv, lambda: _launch(
            x, w13, w2, topk_weights, topk_ids, DIRECT_TILES, direct, N, D, E, I, k, w13_scale, w2_scale, block,
            w_fp8, a_fp8, reduce))
    if isinstance(direct_tiles, MoEGemvTiles):
        raise MoEError("fused_moe: MoEGemvTiles given but the MMA kernels run (gemv=False, or not FP8 weight-only "
                       "direct mode)")
    t = (direct_tiles or DIRECT_TILES) if direct else (tiles or pick_tiles(P, E))
    if a_fp8 and act_fp8 is None:  # the FP8 x FP8 MMAs by default: weight-only if they cannot compile here
        from kimi_linear.ops.quant.fallback import first_try

        def run(a8: bool):
            return _launch(x, w13, w2, topk_weights, topk_ids, t, direct, N, D, E, I, k, w13_scale, w2_scale,
                           block, w_fp8, a8, reduce)

        return first_try("fused_moe_a8", lambda: run(True), lambda: run(False))
    return _launch(x, w13, w2, topk_weights, topk_ids, t, direct, N, D, E, I, k, w13_scale, w2_scale, block,
                   w_fp8, a_fp8, reduce)


def _launch(x, w13, w2, topk_weights, topk_ids, t: MoETiles, direct: bool, N, D, E, I, k, w13_scale, w2_scale,
            block, w_fp8: bool, a_fp8: bool, reduce: bool):
    BM = t.block_m
    E_P = triton.next_power_of_2(E)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if direct:
        sorted_pairs = start = count = topk_ids  # unused in direct mode
        num_m = N * k
        R = N * k
    else:
        sorted_pairs, start, count = moe_align(topk_ids, E, BM)
        R = sorted_pairs.numel()
        num_m = triton.cdiv(R, BM)
    P = N * k
    q = _fp8_launch(w_fp8, a_fp8, block)
    x_in, xs = x, x
    if a_fp8:
        x_in, xs = _per_token_fp8(x)
    h = torch.empty(R, I, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = t.up
    bk = scale_tile_k(bk, block)
    s13 = w13_scale if w_fp8 else x
    _moe_up_kernel[(num_m * triton.cdiv(I, bn),)](
        x_in, w13, h, sorted_pairs, start, count, topk_ids, s13, xs, s13.stride(0) if w_fp8 else 0,
        s13.stride(1) if w_fp8 else 0, num_m, E, D, I, TOPK=k, PREC=prec,
        EVEN_K=D % bk == 0, EVEN_N=I % bn == 0, BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t.group_m, E_P=E_P,
        DIRECT=direct, num_warps=warps, num_stages=stages, **q)

    h_in, hs = h, h
    if a_fp8:
        h_in, hs = _per_token_fp8(h)
    y = torch.empty(P, D, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = t.down
    bk = scale_tile_k(bk, block)
    s2 = w2_scale if w_fp8 else x
    _moe_down_kernel[(num_m * triton.cdiv(D, bn),)](
        h_in, w2, y, sorted_pairs, start, count, topk_ids, s2, hs, s2.stride(0) if w_fp8 else 0,
        s2.stride(1) if w_fp8 else 0, num_m, E, D, I, PREC=prec,
        EVEN_K=I % bk == 0, EVEN_N=D % bn == 0, BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t.group_m, E_P=E_P,
        DIRECT=direct, num_warps=warps, num_stages=stages, **q)
    return _reduce(y, topk_weights, N, k, D, reduce)


def _reduce(y: torch.Tensor, topk_weights: torch.Tensor, N: int, k: int, D: int, reduce: bool):
    """The pair outputs y [N * k, D] -> out [N, D] (weighted k-way sum, fp32), or (y [N, k, D], topk_weights)."""
    if not reduce:
        return y.view(N, k, D), topk_weights
    out = torch.empty(N, D, dtype=y.dtype, device=y.device)
    block_d = min(1024, triton.next_power_of_2(D))
    _moe_sum_kernel[(N, triton.cdiv(D, block_d))](y, topk_weights, out, D, TOPK=k, BLOCK_D=block_d, num_warps=4)
    return out
