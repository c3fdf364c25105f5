"""FP8-weight GEMV for decode (Triton): y [M, N] = x [M, K] @ (w_fp8 [N, K] * scale)^T for M <= GEMV_MAX_M rows.

A decode GEMM is all weight bytes, so the kernel is built to stream them: each program loads [BLOCK_N,
BLOCK_K] fp8 tiles (contiguous along K: 16-byte vector loads, no K mask unless K is ragged), upcasts them to
fp32 in registers (exact: e4m3 fits fp16/bf16/fp32), multiplies by each activation row (x's dtype, upcast to
fp32) and reduces along K with `tl.sum` into an fp32 [M, BLOCK_N] accumulator: no MMA, no layout conversion
of the weight. Same numerics as `fp8_gemm` (weight-only: x is never quantized; the products of an e4m3 and a
bf16/fp16 value are exact in fp32, the sums fp32), only the summation order differs.

Scales as in `fp8_gemm`: per output channel ([N, 1], applied once to the final sum) or block-wise
([ceil(N / BN_s), ceil(K / BK_s)], BLOCK_K divides BK_s, each tile's partial sum scaled as it is added).

Split-K (narrow N: too few column blocks to fill the SMs): grid (column blocks, SPLIT_K); each program sums a
K range (a multiple of BLOCK_K, and of BK_s for block scales) and writes its fp32 partial to a workspace
[SPLIT_K, M, N]; then it counts itself in with an acq_rel atomic on its column block's counter, and the last
of the SPLIT_K programs sums the partials in split order (deterministic), scales, stores y and resets the
counter to 0. The counters are one zeroed int32 buffer per device kept by this module (`split_k_counters`),
always left at 0 by the kernels: launches on one device must not run concurrently on two streams (the engine
runs one stream). No host sync, grid and workspace fixed by shapes: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import QuantError

GEMV_MAX_M = 8  # rows of x up to which `fp8_gemm` takes this kernel on CUDA (ALU per weight byte grows with M)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # counter buffers replaced by larger ones (kept alive for captured graphs)
_SMS: dict[int, int] = {}


def split_k_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters on `device`, shared by the split-K launches (each leaves
    the counters it used at 0)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:  # a captured CUDA graph may still point at it: never freed
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


# ---------------------------------------------------------------------------------------------- split-K
@triton.jit
def split_k_arrive(count_ptr, slot, SPLIT_K: tl.constexpr):
    """After this program stored its partials: count it in at counter `slot`; True for the last of SPLIT_K
    (which also resets the counter to 0). Barrier first, so every thread's partial is written before the
    release; the acquire orders the last program's reads of the others' partials after their stores."""
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
    last = done == SPLIT_K - 1
    tl.store(count_ptr + slot, 0, mask=last)
    return last


@triton.jit
def split_k_sum(part_ptr, offs, mask, stride, last, SPLIT_K: tl.constexpr):
    """sum over s < SPLIT_K of part[s * stride + offs] in split order (fp32, read from L2), where `last`."""
    total = tl.load(part_ptr + offs, mask=mask & last, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(part_ptr + s * stride + offs, mask=mask & last, other=0.0, cache_modifier=".cg")
    return total


# ---------------------------------------------------------------------------------------------- GEMV
@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, N, K, K_SPLIT, s_xm, s_ym, s_sn,
                     M: tl.constexpr, BLOCK_M: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                     BLOCK_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:  # no K mask: the loads stay 16-byte vectors
            w = tl.load(w_ptrs, mask=mn[:, None], other=0.0)
        else:
            mk = offs_k < k_hi
            w = tl.load(w_ptrs, mask=mn[:, None] & mk[None, :], other=0.0)
        w = w.to(tl.float32)
        if BLOCK_SCALE:  # this K tile lies in one scale block column
            s = tl.load(s_ptr + (offs_n // SBN) * s_sn + k0 // SBK, mask=mn, other=0.0)
        for m in tl.static_range(M):
            if EVEN_K:
                xr = tl.load(x_ptr + m * s_xm + offs_k)
            else:
                xr = tl.load(x_ptr + m * s_xm + offs_k, mask=mk, other=0.0)
            part = tl.sum(w * xr.to(tl.float32)[None, :], axis=1)
            if BLOCK_SCALE:
                part = part * s
            acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    mo = (offs_m < M)[:, None] & mn[None, :]
    if SPLIT_K > 1:
        offs_p = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + offs_p, acc, mask=mo)
        last = split_k_arrive(count_ptr, pid_n, SPLIT_K)
        acc = split_k_sum(part_ptr, offs_p, mo, M * N, last, SPLIT_K)
        mo = mo & last
    if not BLOCK_SCALE:
        acc = acc * tl.load(s_ptr + offs_n * s_sn, mask=mn, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mo)


def block_k_for(K: int, cap: int = 512) -> int:
    """The widest power-of-two K tile <= cap (and >= 16) that divides K (so no tile needs a K mask: the loads
    stay 16-byte vectors); for a K that is no multiple of 16, min(cap, 256) with a masked last tile."""
    for bk in (512, 256, 128, 64, 32, 16):
        if bk <= cap and K % bk == 0:
            return bk
    return max(16, min(cap, 256, triton.next_power_of_2(K)))


def split_k_for(programs: int, k_tiles: int, num_sms: int) -> int:
    """Split-K doubled while the grid has fewer than 4 programs per SM and each split keeps >= 2 K tiles."""
    split = 1
    while programs * split < 4 * num_sms and k_tiles >= 4 * split:
        split *= 2
    return split


def gemv_tiles(M: int, N: int, K: int, block_k_max: int = 512, num_sms: int = 132) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) by a rule: 16-row tiles up to 512 fp8 bytes wide
    (`block_k_for`: 8 KB, 4 16-byte vectors per thread at 4 warps), split-K by `split_k_for`. block_k_max caps
    BLOCK_K (block scales: the block width)."""
    bk = block_k_for(K, block_k_max)
    bn = 16
    return bn, bk, split_k_for(triton.cdiv(N, bn), triton.cdiv(K, bk), num_sms), 4, 2


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (132 elsewhere, an H100 / H200), cached: the tile rules read it per call."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
             tiles: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride, M <= 16) @ (w [N, K] fp8 * scale)^T -> y [M, N] in x's dtype.
    scale: fp32 [N, 1] (per channel) or [ceil(N / BN), ceil(K / BK)] for block = (BN, BK).
    tiles (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) overrides `gemv_tiles` (benchmarks/fp8_tiles.py);
    BLOCK_K is halved until it divides the block width, SPLIT_K is cut to the K tiles there are."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or w.dtype != torch.float8_e4m3fn or not w.is_contiguous():
        raise QuantError(f"fp8_gemv: need a contiguous float8_e4m3fn weight [N, K={K}], got {w.dtype} {tuple(w.shape)}")
    if M > 16:
        raise QuantError(f"fp8_gemv: at most 16 rows of x (decode), got {M}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale = scale if scale.dtype == torch.float32 else scale.float()
    if block is None:
        if tuple(scale.shape) != (N, 1):
            raise QuantError(f"fp8_gemv: per-channel scale must be [{N}, 1], got {tuple(scale.shape)}")
        sbn, sbk = 1, 1
    else:
        sbn, sbk = block
        if tuple(scale.shape) != (-(-N // sbn), -(-K // sbk)):
            raise QuantError(f"fp8_gemv: block scale must be [{-(-N // sbn)}, {-(-K // sbk)}], got {tuple(scale.shape)}")
        if sbk % 16:
            raise QuantError(f"fp8_gemv: block width {sbk} must be a multiple of 16")
        if scale.stride(1) != 1:
            scale = scale.contiguous()
    bn, bk, split, warps, stages = tiles or gemv_tiles(M, N, K, sbk if block is not None else 512,
                                                       sm_count(x.device))
    if block is not None:
        while bk > sbk or sbk % bk:
            bk //= 2
    if K == 0:
        return torch.zeros(M, N, dtype=x.dtype, device=x.device)
    k_tiles = triton.cdiv(K, bk)
    split = max(1, min(split, k_tiles))
    k_split = triton.cdiv(k_tiles, split) * bk  # a multiple of BLOCK_K (and of the block width's divisor bk)
    split = triton.cdiv(K, k_split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    num_n = triton.cdiv(N, bn)
    if split > 1:
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        count = split_k_counters(x.device, num_n)
    else:
        part = count = y  # unused
    _fp8_gemv_kernel[(num_n, split)](
        x, w, scale, y, part, count, N, K, k_split, x.stride(0), y.stride(0), scale.stride(0),
        M=M, BLOCK_M=triton.next_power_of_2(M), SBN=sbn, SBK=sbk, BLOCK_SCALE=block is not None, SPLIT_K=split,
        EVEN_K=K % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y
