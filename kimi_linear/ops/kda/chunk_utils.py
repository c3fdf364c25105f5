"""Shared pieces of the chunkwise KDA kernels: chunk indexing, the fused gate, row-block loads.

Chunk indexing. A batch is N sequences; with `cu_seqlens` they lie back to back in one flat token
axis (B = 1), otherwise sequence b occupies tokens [b T, (b + 1) T). Every sequence is cut into
chunks of BT = 64 tokens (the last one partial, masked). Chunk-indexed buffers (per-chunk decay,
per-chunk states) have one slot per chunk: `chunk_offsets[n]` is the first slot of sequence n. The
per-chunk kernels run on a grid of `NT` slots; `chunk_seq[i]` names the sequence of slot i
(N for unused slots, which exit at once). Without a host copy of `cu_seqlens` the indexing is built
on the device with an upper bound NT = T // 64 + N, so the forward never syncs with the host.

Gate. g = -exp(A_log[h]) * softplus(f + dt_bias) in fp32 (softplus threshold 20), computed in the
kernels from the raw input f. The kernels work in log2 units (G2 = G * log2(e), decays via exp2).
The log decay must be <= 0 (it is, by construction, with the in-kernel gate): the anchored
intra-chunk products rely on the cumulative decay being non-increasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


BT = 64  # chunk size
BC = 16  # sub-chunk size of the intra-chunk products
LOG2E = 1.4426950408889634


@dataclass
class ChunkIndex:
    """How sequences map onto chunks. `chunk_seq` / `chunk_offsets` are None without cu_seqlens."""

    N: int  # number of sequences
    NT: int  # chunk slots (grid size of the per-chunk kernels)
    NT_seq: int  # chunks per sequence without cu_seqlens (0 with cu_seqlens)
    chunk_seq: torch.Tensor | None  # [NT] int32
    chunk_offsets: torch.Tensor | None  # [N + 1] int32


def prepare_chunks(cu_seqlens: torch.Tensor | None, B: int, T: int,
                   cu_seqlens_cpu: torch.Tensor | None = None) -> ChunkIndex:
    """Chunk indexing for a batch [B, T] (or B = 1 with `cu_seqlens` [N + 1])."""
    if cu_seqlens is None:
        nt = triton.cdiv(T, BT)
        return ChunkIndex(B, B * nt, nt, None, None)
    N = cu_seqlens.numel() - 1
    device = cu_seqlens.device
    if cu_seqlens_cpu is not None:
        cu = cu_seqlens_cpu.to(torch.int64)
        nch = (cu[1:] - cu[:-1] + BT - 1) // BT
        offsets = torch.zeros(N + 1, dtype=torch.int64)
        offsets[1:] = nch.cumsum(0)
        NT = int(offsets[-1])
        chunk_seq = torch.repeat_interleave(torch.arange(N, dtype=torch.int32), nch)
        return ChunkIndex(N, max(NT, 1), 0, chunk_seq.to(device) if NT > 0 else
                          torch.full((1,), N, dtype=torch.int32, device=device),
                          offsets.to(device=device, dtype=torch.int32))
    cu = cu_seqlens.to(torch.int64)
    nch = (cu[1:] - cu[:-1] + BT - 1) // BT
    offsets = torch.zeros(N + 1, dtype=torch.int64, device=device)
    offsets[1:] = nch.cumsum(0)
    NT = T // BT + N  # upper bound on sum(ceil(len_n / BT)), no host sync
    slots = torch.arange(NT, dtype=torch.int64, device=device)
    chunk_seq = torch.searchsorted(offsets[1:].contiguous(), slots, right=True).to(torch.int32)
    return ChunkIndex(N, max(NT, 1), 0, chunk_seq, offsets.to(torch.int32))


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' tl.dot input precision for a compute dtype: fp32 inputs keep fp32 products ("ieee", as
    torch's fp32 matmuls by default: no silent tf32), every other dtype the tensor-core default ("tf32"
    applies to the fp32 operands formed in registers; bf16 operands multiply exactly)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Jitted helpers


@triton.jit
def chunk_of_program(i_t, i_b, T, N, NT_seq, cu_seqlens, chunk_seq, chunk_offsets,
                     IS_VARLEN: tl.constexpr):
    """(sequence, chunk within it, bos, eos, valid) of chunk slot i_t (batch row i_b without varlen)."""
    if IS_VARLEN:
        n = tl.load(chunk_seq + i_t)
        valid = n < N
        n = tl.minimum(n, N - 1)
        i_c = i_t - tl.load(chunk_offsets + n)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    else:
        n = i_b
        valid = i_t < NT_seq
        i_c = i_t
        bos = (i_b * T).to(tl.int64)
        eos = bos + T
    return n, i_c, bos, eos, valid


@triton.jit
def softplus(x):
    """log(1 + exp(x)) in fp32, threshold 20 (x itself above), accurate for very negative x."""
    e = tl.exp(-tl.abs(x))
    small = e * (1.0 - e * (0.5 - e * 0.3333333333333333))
    l1p = tl.where(e < 0.01, small, tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + l1p)


@triton.jit
def sigmoid_thr(x):
    """d softplus / dx with the threshold: sigmoid(x), exactly 1 above 20."""
    e = tl.exp(-tl.abs(x))
    s = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return tl.where(x > 20.0, 1.0, s)


@triton.jit
def load_tile(base, orow, m_r, stride, cols, m_c, EVEN_C: tl.constexpr):
    """[R, C] fp32 tile at scalar pointer `base` (row r at base + r * stride); int32 in-tile offsets
    keep per-element addresses cheap (64-bit element pointers cost two registers each)."""
    p = base + orow[:, None] * stride + cols[None, :]
    if EVEN_C:
        x = tl.load(p, mask=m_r[:, None], other=0.0)
    else:
        x = tl.load(p, mask=m_r[:, None] & m_c[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_tile(base, x, orow, m_r, stride, cols, m_c, EVEN_C: tl.constexpr):
    p = base + orow[:, None] * stride + cols[None, :]
    if EVEN_C:
        tl.store(p, x.to(base.dtype.element_ty), mask=m_r[:, None])
    else:
        tl.store(p, x.to(base.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def load_vec(base, cols, m_c, ok, EVEN_C: tl.constexpr):
    """[C] fp32 row at scalar pointer `base`, all zero unless `ok`."""
    if EVEN_C:
        x = tl.load(base + cols, mask=ok & (cols >= 0), other=0.0)
    else:
        x = tl.load(base + cols, mask=ok & m_c, other=0.0)
    return x.to(tl.float32)


@triton.jit
def gate_log2(f_base, orow, m_r, s_f, cols, m_c, dtb, neg_a, USE_GATE: tl.constexpr, HAS_DTB: tl.constexpr,
              EVEN_C: tl.constexpr):
    """Per-token log decay in log2 units, [R, BK] fp32, zero on masked rows/columns."""
    x = load_tile(f_base, orow, m_r, s_f, cols, m_c, EVEN_C)
    if USE_GATE:
        if HAS_DTB:
            x = x + dtb[None, :]
        g = neg_a * softplus(x)
    else:
        g = x
    if EVEN_C:
        return tl.where(m_r[:, None], g * 1.4426950408889634, 0.0)
    return tl.where(m_r[:, None] & m_c[None, :], g * 1.4426950408889634, 0.0)


@triton.jit
def load_beta(b_base, orow, m_r, s_b, USE_SIGMOID: tl.constexpr):
    b = tl.load(b_base + orow * s_b, mask=m_r, other=0.0).to(tl.float32)
    if USE_SIGMOID:
        b = tl.sigmoid(b)
    return tl.where(m_r, b, 0.0)


@triton.jit
def pair_rows(x_b, r, stride, cols, m_c, hi, n_valid, r_b, H: tl.constexpr, USE_L2: tl.constexpr):
    """[16, BK] fp32: row r (tiles rows 0..7) and row r + 8 (rows 8..15) of x, times their inverse norms
    (fused norm); two row loads broadcast, not a gather."""
    lo = tl.load(x_b + r * stride + cols, mask=m_c & (r < n_valid), other=0.0).to(tl.float32)
    up = tl.load(x_b + (r + 8) * stride + cols, mask=m_c & (r + 8 < n_valid), other=0.0).to(tl.float32)
    if USE_L2:
        lo = lo * tl.load(r_b + r * H, mask=r < n_valid, other=0.0)
        up = up * tl.load(r_b + (r + 8) * H, mask=r + 8 < n_valid, other=0.0)
    return tl.where(hi[:, None], up[None, :], lo[None, :])

