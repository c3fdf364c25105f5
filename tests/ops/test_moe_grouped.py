"""The differentiable grouped-GEMM MoE experts (`ops.moe.grouped_moe_experts`, the CUDA bf16 training
path) against the naive expert loop: values and gradients of x, both weight stacks and the routing
weights, with experts that get no token, one expert taking everything, and bf16. torch's grouped GEMM
has a CPU implementation, so the same code is checked here."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.moe import grouped_moe_experts, naive_moe_experts


def _run(fn, x, w13, w2, w, ids):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2, w)]
    y = fn(*leaves, ids)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    (y.float() * g.float()).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("N, E, k, skew", [(9, 4, 2, False), (20, 8, 3, False), (5, 6, 1, True), (1, 3, 3, False)])
def test_grouped_matches_loop(N, E, k, skew):
    D, I = 16, 8
    x = torch.randn(N, D)
    w13 = torch.randn(E, 2 * I, D) / D ** 0.5
    w2 = torch.randn(E, D, I) / I ** 0.5
    scores = torch.rand(N, E)
    if skew:
        scores[:, 2] += 10  # every token picks expert 2; most experts get nothing
    w, ids = scores.topk(k, dim=-1)
    ref = _run(naive_moe_experts, x, w13, w2, w, ids)
    got = _run(grouped_moe_experts, x, w13, w2, w, ids)
    for name, a, b in zip(("y", "x", "w13", "w2", "weights"), ref, got):
        assert_close(f"grouped vs loop: {name}", a, b, 1e-5)


def test_grouped_bf16():
    N, E, k, D, I = 24, 4, 2, 16, 8
    x = torch.randn(N, D).bfloat16()
    w13 = (torch.randn(E, 2 * I, D) / 4).bfloat16()
    w2 = (torch.randn(E, D, I) / 3).bfloat16()
    w, ids = torch.rand(N, E).topk(k, dim=-1)
    ref = naive_moe_experts(x.float(), w13.float(), w2.float(), w, ids)
    got = grouped_moe_experts(x, w13, w2, w, ids)
    assert got.dtype == torch.bfloat16
    assert_close("grouped bf16 vs fp32 loop", ref, got, 2e-2)


def test_grouped_bf16_gradients():
    """The bf16 path's own backward (dispatch regathered, down projection + combine): every gradient close to
    the fp32 loop's."""
    N, E, k, D, I = 40, 6, 3, 32, 16
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=gen)
    w13 = torch.randn(E, 2 * I, D, generator=gen) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=gen) / I ** 0.5
    w, ids = torch.rand(N, E, generator=gen).topk(k, dim=-1)
    ref = _run(naive_moe_experts, x, w13, w2, w, ids)
    got = _run(lambda a, b, c, d, e: grouped_moe_experts(a.bfloat16(), b.bfloat16(), c.bfloat16(), d, e),
               x, w13, w2, w, ids)
    for name, a, b in zip(("y", "x", "w13", "w2", "weights"), ref, got):
        assert_close(f"grouped bf16 vs fp32 loop: {name}", a.float(), b.float(), 3e-2)
