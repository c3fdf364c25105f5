"""The differentiable torch forms that training runs where a kernel has no backward, against the naive
references (values and gradients, fp32): the packed-document short conv and the per-document SDPA MLA
prefill. Documents never see each other: a packed row equals its documents one by one."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.conv import causal_conv1d_varlen, naive_causal_conv1d
from kimi_linear.ops.mla import mla_prefill_sdpa, naive_mla_prefill


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("lengths, W", [([5, 1, 2, 9], 4), ([3], 3), ([1, 1, 1], 4), ([7, 6], 2)])
def test_conv_varlen_matches_naive(lengths, W):
    C = 6
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(sum(lengths), C)
    w = torch.randn(C, W)
    ref, ref_g = _grads(lambda a, b: naive_causal_conv1d(a, b, None, cu), x, w)
    got, got_g = _grads(lambda a, b: causal_conv1d_varlen(a, b, cu), x, w)
    assert_close("conv output", ref, got, 1e-6)
    for name, a, b in zip(("x", "weight"), ref_g, got_g):
        assert_close(f"conv grad {name}", a, b, 1e-6)


def test_conv_varlen_no_silu_and_bf16():
    x = torch.randn(10, 4).bfloat16()
    w = torch.randn(4, 4)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert_close("conv without activation", naive_causal_conv1d(x, w, None, cu, activation=None),
                 causal_conv1d_varlen(x, w, cu, activation=None), 1e-2)
    assert causal_conv1d_varlen(x, w, cu).dtype == torch.bfloat16


@pytest.mark.parametrize("lengths", [[6, 1, 11], [4], [5, 5, 5], [3, 0, 3]])
def test_mla_sdpa_matches_naive(lengths):
    H, Dn, Dr, Dv, R = 2, 8, 4, 6, 10
    T = sum(lengths)
    q = torch.randn(T, H, Dn + Dr)
    latent = torch.randn(T, R + Dr)
    w = torch.randn(H * (Dn + Dv), R) / R ** 0.5
    scale = (Dn + Dr) ** -0.5

    def naive(q, latent, w):
        return naive_mla_prefill(q, latent, None, None, lengths, [0] * len(lengths), w, Dv, scale)

    ref, ref_g = _grads(naive, q, latent, w)
    got, got_g = _grads(lambda a, b, c: mla_prefill_sdpa(a, b, lengths, c, Dv, scale), q, latent, w)
    assert_close("MLA output", ref, got, 1e-5)
    for name, a, b in zip(("q", "latent", "w_kv_b"), ref_g, got_g):
        assert_close(f"MLA grad {name}", a, b, 1e-5)
