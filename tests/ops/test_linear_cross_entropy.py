"""Chunked linear + cross-entropy (`ops.loss`) against the naive full-logits form: the loss sum, the
target count and the gradients of hidden and weight, with ignored targets, chunk sizes that do and do
not divide the rows, rows without any target, bf16 autocast, frozen inputs, and bad targets."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.errors import OpError
from kimi_linear.ops.loss import linear_cross_entropy, naive_linear_cross_entropy


def _run(fn, h, w, y, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss, num = fn(h, w, y, **kw)
    (loss * 0.37).backward()
    return loss.detach(), num, h.grad, w.grad


@pytest.mark.parametrize("N, chunk", [(13, 4), (16, 16), (16, 1), (5, None)])
def test_matches_full_logits(N, chunk):
    D, V = 8, 50
    h, w = torch.randn(N, D), torch.randn(V, D)
    y = torch.randint(0, V, (N,))
    y[::3] = -100
    ref = _run(naive_linear_cross_entropy, h, w, y)
    got = _run(linear_cross_entropy, h, w, y, chunk=chunk)
    assert_close("loss_sum", ref[0], got[0], 1e-6)
    assert got[1].dtype == torch.int64 and int(got[1]) == int(ref[1]) == int((y != -100).sum())
    assert_close("grad hidden", ref[2], got[2], 1e-5)
    assert_close("grad weight", ref[3], got[3], 1e-5)


def test_no_targets_gives_zero_loss_and_zero_grads():
    h, w = torch.randn(6, 4), torch.randn(10, 4)
    y = torch.full((6,), -100)
    loss, num, gh, gw = _run(linear_cross_entropy, h, w, y, chunk=4)
    assert loss.item() == 0.0 and int(num) == 0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    loss, num, gh, gw = _run(linear_cross_entropy, torch.randn(0, 4), w, torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0 and int(num) == 0 and gh.shape == (0, 4)


def test_frozen_weight_and_no_grad():
    h, w = torch.randn(7, 4, requires_grad=True), torch.randn(9, 4)
    y = torch.randint(0, 9, (7,))
    loss, num = linear_cross_entropy(h, w, y, chunk=3)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_()
    naive_linear_cross_entropy(ref_h, w, y)[0].backward()
    assert_close("grad hidden, frozen weight", ref_h.grad, h.grad, 1e-5)
    with torch.no_grad():
        loss2, _ = linear_cross_entropy(h, w, y)
    assert not loss2.requires_grad and loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_bf16_autocast_computes_in_bf16_with_fp32_loss():
    h, w = torch.randn(12, 16), torch.randn(40, 16)
    y = torch.randint(0, 40, (12,))
    ref = _run(naive_linear_cross_entropy, h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(linear_cross_entropy, h, w, y, chunk=5)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    assert_close("bf16 loss_sum", ref[0], got[0], 2e-2)
    assert_close("bf16 grad hidden", ref[2], got[2], 5e-2)
    assert_close("bf16 grad weight", ref[3], got[3], 5e-2)


def test_bad_inputs_fail_clearly():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(OpError, match="target ids"):
        linear_cross_entropy(h, w, torch.tensor([0, 5, 1]))
    with pytest.raises(OpError, match="target ids"):
        linear_cross_entropy(h, w, torch.tensor([0, -3, 1]))
    with pytest.raises(OpError, match="labels must be"):
        linear_cross_entropy(h, w, torch.tensor([0, 1]))
    with pytest.raises(OpError, match="weight"):
        linear_cross_entropy(h, torch.randn(5, 3), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("V", [50, 9000])  # one block of the row, and several with a ragged last one
def test_kernel_path_matches_full_logits(monkeypatch, V, device):
    """The Triton chunk step (`softmax_grad.py`; compiled on CUDA, the interpreter on the CPU): loss and both
    gradients against the full fp32 logits on the CPU."""
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    N, D = 11, 8
    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[1] = -100
    ref = _run(naive_linear_cross_entropy, h, w, y)
    got = [t.cpu() for t in _run(linear_cross_entropy, h.to(device), w.to(device), y.to(device), chunk=3)]
    assert_close("loss_sum (kernel)", ref[0], got[0], 1e-6)
    assert_close("grad hidden (kernel)", ref[2], got[2], 1e-5)
    assert_close("grad weight (kernel)", ref[3], got[3], 1e-5)
