"""The Triton training short conv (`ops/conv/short_conv_train.py`, its own backward) equals the naive
reference in value and gradients (x and weight): packed documents never see each other, W in 1 .. 4,
with and without SiLU, fp32 and bf16, a row-strided input. On CUDA compiled; on the CPU under
TRITON_INTERPRET=1. Scratch memory is NaN-poisoned (`poison_empty`)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.conv import naive_causal_conv1d
from kimi_linear.ops.conv.short_conv_train import causal_conv1d_train


def _grads(fn, x, w, seed=1):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    (y.float() * g.float()).sum().backward()
    return y.detach().float().cpu(), x.grad.float().cpu(), w.grad.float().cpu()


@pytest.mark.parametrize("lengths, W, act", [([5, 1, 2, 40], 4, "silu"), ([37], 3, "silu"), ([1, 1, 1], 4, None),
                                             ([7, 6], 2, "silu"), ([9, 3], 1, None)])
def test_conv_train_matches_naive(lengths, W, act, device, poison_empty):
    C = 136  # more than one channel block, a ragged last one
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), C, generator=gen)
    w = torch.randn(C, 1, W, generator=gen)
    ref = _grads(lambda a, b: naive_causal_conv1d(a, b, None, cu, activation=act), x, w)
    got = _grads(lambda a, b: causal_conv1d_train(a, b, cu.to(device), activation=act), x.to(device), w.to(device))
    for name, a, b in zip(("output", "grad x", "grad weight"), ref, got):
        assert_close(f"train conv {name}", a, b, 1e-5)


def test_conv_train_bf16_and_one_document(device, poison_empty):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 64, generator=gen)
    w = torch.randn(64, 4, generator=gen)
    ref = _grads(lambda a, b: naive_causal_conv1d(a, b, None, None), x, w)
    got = _grads(lambda a, b: causal_conv1d_train(a, b, None), x.bfloat16().to(device), w.to(device))
    assert got[0].dtype == torch.float32  # compared in fp32; the kernel's output is bf16
    for name, a, b in zip(("output", "grad x", "grad weight"), ref, got):
        assert_close(f"bf16 train conv {name}", a, b, 2e-2)


def test_conv_train_reads_a_row_strided_view(device, poison_empty):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(20, 100, generator=gen)
    w = torch.randn(64, 4, generator=gen)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    ref = _grads(lambda a, b: naive_causal_conv1d(a[:, 10:74], b, None, cu), wide, w)
    got = _grads(lambda a, b: causal_conv1d_train(a[:, 10:74], b, cu.to(device)), wide.to(device), w.to(device))
    for name, a, b in zip(("output", "grad of the wide input", "grad weight"), ref, got):
        assert_close(f"strided train conv {name}", a, b, 1e-5)


def test_conv_train_rejects_bad_inputs():
    from kimi_linear.errors import ConvError

    with pytest.raises(ConvError, match="kernel width"):
        causal_conv1d_train(torch.randn(4, 8), torch.randn(8, 5))
    with pytest.raises(ConvError, match="activation"):
        causal_conv1d_train(torch.randn(4, 8), torch.randn(8, 4), activation="relu")
