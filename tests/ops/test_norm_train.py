"""The Triton training RMSNorm (`ops/norm/rmsnorm_train.py`, its own backward) equals the naive reference
(`naive_fused_rms_norm`) in value and gradients (branch, residual, weight), with and without the residual
add, fp32 and a bf16 branch over an fp32 stream, and a bf16 output (autocast); the gated output norm
likewise. Compiled on CUDA, TRITON_INTERPRET=1 on the CPU; scratch memory NaN-poisoned."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.norm import naive_fused_rms_norm
from kimi_linear.ops.norm.rmsnorm_train import rms_norm_train


def _run(fn, x, w, r, device="cpu"):
    x = x.detach().clone().to(device).requires_grad_()
    w = w.detach().clone().to(device).requires_grad_()
    r = None if r is None else r.detach().clone().to(device).requires_grad_()
    out = fn(x, w, r)
    y, s = out if isinstance(out, tuple) else (out, None)
    gen = torch.Generator().manual_seed(3)
    loss = (y.float() * torch.randn(y.shape, generator=gen).to(device)).sum()
    if s is not None:  # the stream feeds the next layer too
        loss = loss + (s.float() * torch.randn(s.shape, generator=gen).to(device)).sum()
    loss.backward()
    res = [y.detach().float()] + ([s.detach().float()] if s is not None else [])
    res += [x.grad.float(), w.grad.float()] + ([r.grad.float()] if r is not None else [])
    return [t.cpu() for t in res]


@pytest.mark.parametrize("N, D, residual, bdtype", [(7, 48, True, torch.float32), (5, 64, False, torch.float32),
                                                     (9, 40, True, torch.bfloat16), (1030, 16, True, torch.float32)])
def test_train_norm_matches_naive(N, D, residual, bdtype, device, poison_empty):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen).to(bdtype)
    w = 1 + 0.1 * torch.randn(D, generator=gen)
    r = torch.randn(N, D, generator=gen) if residual else None
    ref = _run(lambda a, b, c: naive_fused_rms_norm(a, b, 1e-6, c), x, w, r)
    got = _run(lambda a, b, c: rms_norm_train(a, b, 1e-6, residual=c), x, w, r, device)
    tol = 1e-5 if bdtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(ref, got)):
        assert_close(f"train norm tensor {i}", a, b, tol)


def test_train_norm_bf16_output_and_errors(device):
    from kimi_linear.errors import NormError

    gen = torch.Generator().manual_seed(1)
    x, r, w = torch.randn(6, 32, generator=gen).bfloat16(), torch.randn(6, 32, generator=gen), torch.rand(32) + 0.5
    y, s = rms_norm_train(x.to(device), w.to(device), 1e-6, residual=r.to(device), out_dtype=torch.bfloat16)
    y, s = y.cpu(), s.cpu()
    ref_y, ref_s = naive_fused_rms_norm(x, w, 1e-6, r)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close("bf16 output", ref_y, y.float(), 1e-2)
    assert_close("stream", ref_s, s, 1e-6)
    with pytest.raises(NormError, match="residual"):
        rms_norm_train(x, w, 1e-6, residual=r[:3])


@pytest.mark.parametrize("N, H, K, dtype", [(5, 3, 32, torch.float32), (300, 2, 16, torch.float32),
                                            (7, 2, 24, torch.bfloat16)])
def test_train_gated_norm_matches_naive(N, H, K, dtype, device, poison_empty):
    from kimi_linear.ops.norm import gated_rms_norm
    from kimi_linear.ops.norm.gated_norm_train import gated_rms_norm_train

    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(N, 2 * H * K, generator=gen).to(dtype)  # x and gate as strided views of one projection
    x, g = wide[:, :H * K].view(N, H, K), wide[:, H * K:].view(N, H, K)
    w = 1 + 0.1 * torch.randn(K, generator=gen)

    def run(fn, dev):
        xx, gg, ww = (t.detach().clone().to(dev).requires_grad_() for t in (x, g, w))
        y = fn(xx, gg, ww, 1e-5)
        (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dev)).sum().backward()
        return [t.cpu() for t in (y.detach().float(), xx.grad.float(), gg.grad.float(), ww.grad.float())]

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("y", "grad x", "grad gate", "grad weight"), run(gated_rms_norm, "cpu"),
                       run(gated_rms_norm_train, device)):
        assert_close(f"gated norm {name}", a, b, tol)
