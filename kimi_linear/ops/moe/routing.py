"""Fused MoE router on the GPU (Triton): the same result as `naive.sigmoid_grouped_topk`, in two launches
and with no host synchronisation (CUDA-graph capturable).

1. `_router_logits_kernel`: logits [N, E] fp32 = x [N, D] @ gate_weight [E, D]^T. bf16 operands are
   multiplied exactly and accumulated in fp32, which equals the reference's fp32 upcast-then-matmul up
   to summation order; fp32 operands use IEEE fp32 dot products (no TF32). Decode-sized batches
   (N <= GEMV_MAX_TOKENS) use `_router_logits_gemv_kernel` instead: each of many programs holds a few
   whole weight rows in registers (one load) and does exact fp32 multiply-adds for every token.
2. `_router_topk_kernel`: one program per token. scores = sigmoid(logits), choice = scores + bias; the
   experts are laid out as [groups, experts per group]; groups are ranked by the sum of their two best
   choices, the best `topk_group` are kept, the others masked to -inf; then top-k on choice by repeated
   first-argmax (ties go to the lower expert id); weights gathered from scores (or from choice with
   `biased_weights`), optionally renormalised (+1e-20), scaled.

Outputs: topk_weights [N, k] fp32 (best expert first), topk_ids [N, k] int64. With `num_shared` = S > 0
they are [N, k + S]: slots k .. k + S - 1 hold the shared experts as ids E .. E + S - 1 with weight 1.0
(not renormalised nor scaled), so that `fused_moe` over [E + S] stacked experts adds the shared experts.
The top-k kernel runs one warp per token (its reductions are then warp shuffles only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.errors import MoEError

GEMV_MAX_TOKENS = 4


@triton.jit
def _router_logits_gemv_kernel(x_ptr, w_ptr, out_ptr, N, E, sx_n, D: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.arange(0, BLOCK_D)
    cmask = cols < E
    dmask = d < D
    w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + d[None, :], mask=cmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    n = 0
    while n < N:
        xv = tl.load(x_ptr + n * sx_n + d, mask=dmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * E + cols, tl.sum(w * xv[None, :], 1), mask=cmask)
        n += 1


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, out_ptr, N, E, D: tl.constexpr, BF16_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < E
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * D + offs_k[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * D + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + offs_k) < D
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if BF16_DOT:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def topk_row(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, PER, scaling,
             G: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, NUM_SHARED: tl.constexpr,
             K_P: tl.constexpr, G_P: tl.constexpr, PER_P: tl.constexpr, HAS_BIAS: tl.constexpr,
             BIASED_WEIGHTS: tl.constexpr, RENORMALIZE: tl.constexpr):
    """The grouped top-k of one token: its E fp32 logits at `logits_ptr` (read from L2: another program of
    the same launch may have written them) -> TOPK + NUM_SHARED weights and ids at weights_ptr / ids_ptr."""
    g = tl.arange(0, G_P)
    j = tl.arange(0, PER_P)
    valid = (g[:, None] < G) & (j[None, :] < PER)
    eid = g[:, None] * PER + j[None, :]
    logits = tl.load(logits_ptr + eid, mask=valid, other=0.0, cache_modifier=".cg")
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + eid, mask=valid, other=0.0).to(tl.float32)
    neg_inf = float("-inf")
    big = 2147483647
    choice = tl.where(valid, choice, neg_inf)
    if TOPK_GROUP < G:
        # group score = sum of the group's two best choices; keep the best TOPK_GROUP groups
        top1 = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == top1[:, None], j[None, :], big), axis=1)
        top2 = tl.max(tl.where(j[None, :] == first[:, None], neg_inf, choice), axis=1)
        gscore = tl.where(g < G, top1 + top2, neg_inf)
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=0)
            gbest = tl.min(tl.where(gscore == best, g, big), axis=0)
            keep = keep | (g == gbest)
            gscore = tl.where(g == gbest, neg_inf, gscore)
        choice = tl.where(keep[:, None], choice, neg_inf)
    slots = tl.arange(0, K_P)
    out_id = tl.zeros([K_P], dtype=tl.int64)
    # one packed reduction per pick (not a max, a min and a sum): the order-preserving int32 image of the fp32
    # choice in the high word, the complement of the expert id in the low word, so the max is the best
    # choice and, among equal ones, the smallest id (the tie rule of the reference)
    bits = tl.where(choice == 0.0, 0.0, choice).to(tl.int32, bitcast=True)  # -0.0 ties +0.0, as compared
    eid64 = eid.to(tl.int64)
    keys = (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) << 32) | (0xFFFFFFFF - eid64)
    for s in tl.static_range(TOPK):
        best = tl.max(tl.max(keys, axis=1), axis=0)
        idx = 0xFFFFFFFF - (best & 0xFFFFFFFF)
        out_id = tl.where(slots == s, idx, out_id)
        keys = tl.where(eid64 == idx, -9223372036854775807 - 1, keys)
    # the chosen experts' weights, recomputed from their logits with the same operations (the same bits)
    picked = slots < TOPK
    lg = tl.load(logits_ptr + out_id, mask=picked, other=0.0, cache_modifier=".cg")
    out_w = 1.0 / (1.0 + tl.exp(-lg))
    if HAS_BIAS and BIASED_WEIGHTS:
        out_w = out_w + tl.load(bias_ptr + out_id, mask=picked, other=0.0).to(tl.float32)
    out_w = tl.where(picked, out_w, 0.0)
    if RENORMALIZE:
        out_w = out_w / (tl.sum(out_w, axis=0) + 1e-20)
    out_w = out_w * scaling
    KT: tl.constexpr = TOPK + NUM_SHARED
    if NUM_SHARED > 0:
        shared = (slots >= TOPK) & (slots < KT)
        out_w = tl.where(shared, 1.0, out_w)
        out_id = tl.where(shared, (E + slots - TOPK).to(tl.int64), out_id)
    tl.store(weights_ptr + slots, out_w, mask=slots < KT)
    tl.store(ids_ptr + slots, out_id, mask=slots < KT)


@triton.jit
def _router_topk_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, PER, scaling,
                        G: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, NUM_SHARED: tl.constexpr,
                        K_P: tl.constexpr, G_P: tl.constexpr, PER_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BIASED_WEIGHTS: tl.constexpr, RENORMALIZE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    KT: tl.constexpr = TOPK + NUM_SHARED
    topk_row(logits_ptr + n * E, bias_ptr, weights_ptr + n * KT, ids_ptr + n * KT, E, PER, scaling, G, TOPK_GROUP,
             TOPK, NUM_SHARED, K_P, G_P, PER_P, HAS_BIAS, BIASED_WEIGHTS, RENORMALIZE)


def check_router_args(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                      num_expert_group: int, topk_group: int, num_shared: int) -> None:
    """The router's argument checks (shared by the fused norm + router, `norm_router.py`)."""
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise MoEError(f"router: x {tuple(x.shape)} and gate weight {tuple(gate_weight.shape)} do not match "
                         "([N, D] and [E, D])")
    E = gate_weight.shape[0]
    if not 1 <= top_k <= E:
        raise MoEError(f"router: top_k={top_k} must be in [1, {E}]")
    if num_expert_group < 1 or E % num_expert_group or not 1 <= topk_group <= num_expert_group:
        raise MoEError(f"router: {E} experts cannot form {num_expert_group} groups keeping {topk_group}")
    if bias is not None and bias.shape != (E,):
        raise MoEError(f"router: correction bias shape {tuple(bias.shape)} != ({E},)")
    if num_shared < 0:
        raise MoEError(f"router: num_shared={num_shared} must be >= 0")


def topk_constexprs(E: int, top_k: int, num_expert_group: int, topk_group: int, renormalize: bool,
                    biased_weights: bool, num_shared: int, has_bias: bool) -> dict:
    """The compile-time arguments of `topk_row` (after PER and scaling) for this router."""
    per = E // num_expert_group
    return dict(G=num_expert_group, TOPK_GROUP=topk_group, TOPK=top_k, NUM_SHARED=num_shared,
                K_P=triton.next_power_of_2(top_k + num_shared), G_P=max(2, triton.next_power_of_2(num_expert_group)),
                PER_P=max(2, triton.next_power_of_2(per)), HAS_BIAS=has_bias, BIASED_WEIGHTS=biased_weights,
                RENORMALIZE=renormalize)


def gemv_block_e(D: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_E) of the decode-sized logits GEMV: whole rows, <= 8K weight values a program."""
    block_d = triton.next_power_of_2(D)
    return block_d, max(1, min(16, 8192 // block_d))


def fused_sigmoid_grouped_topk(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                               num_expert_group: int = 1, topk_group: int = 1, renormalize: bool = True,
                               scaling: float = 1.0, biased_weights: bool = False, num_shared: int = 0):
    """x [N, D], gate_weight [E, D], bias [E] or None -> (topk_weights [N, k] fp32, topk_ids [N, k] int64).

    Same contract as `naive.sigmoid_grouped_topk`; ids come best first (the reference leaves them unsorted).
    num_shared = S > 0 appends S shared-expert slots (ids E .. E + S - 1, weight 1.0): [N, k + S].
    """
    check_router_args(x, gate_weight, bias, top_k, num_expert_group, topk_group, num_shared)
    N, D = x.shape
    E = gate_weight.shape[0]
    x = x.contiguous()
    gate_weight = gate_weight.contiguous()
    kt = top_k + num_shared
    weights = torch.empty(N, kt, dtype=torch.float32, device=x.device)
    ids = torch.empty(N, kt, dtype=torch.int64, device=x.device)
    if N == 0:
        return weights, ids
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    if N <= GEMV_MAX_TOKENS:
        block_d, block_e = gemv_block_e(D)
        _router_logits_gemv_kernel[(triton.cdiv(E, block_e),)](x, gate_weight, logits, N, E, x.stride(0), D,
                                                               BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4)
    else:
        bf16 = x.dtype == torch.bfloat16 and gate_weight.dtype == torch.bfloat16
        block_m = 16 if N <= 16 else 64
        block_e = 16 if N <= 16 else 64
        block_k = (256 if N <= 16 else 64) if bf16 else 32
        grid = (triton.cdiv(N, block_m), triton.cdiv(E, block_e))
        _router_logits_kernel[grid](x, gate_weight, logits, N, E, D, BF16_DOT=bf16, BLOCK_M=block_m,
                                    BLOCK_E=block_e, BLOCK_K=block_k, num_warps=4, num_stages=3)
    b = bias.contiguous() if bias is not None else logits
    _router_topk_kernel[(N,)](logits, b, weights, ids, E, E // num_expert_group, float(scaling),
                              **topk_constexprs(E, top_k, num_expert_group, topk_group, renormalize, biased_weights,
                                                num_shared, bias is not None), num_warps=1)
    return weights, ids
