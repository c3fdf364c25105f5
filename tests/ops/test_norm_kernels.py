"""Fused RMSNorm (residual add, weighted branch sum, pass-through tail) and fused gated RMSNorm vs the
naive ops: fp32 tight, bf16 within 1e-2; under the interpreter on the CPU, at the real shapes on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.norm import gated_rms_norm, rms_norm
from kimi_linear.ops.norm.gated_norm import fused_gated_rms_norm
from kimi_linear.ops.norm.rmsnorm import fused_rms_norm

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 40])
def test_rms_norm_plain(device, poison_empty, dtype, D):
    x = torch.randn(5, D, device=device).to(dtype) * 3
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    got = fused_rms_norm(x, w, 1e-5)
    ref = rms_norm(x, w, 1e-5)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert_close("rms_norm", ref.float(), got.float(), _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_residual_is_bit_exact_add(device, poison_empty, dtype):
    D = 48
    x = torch.randn(7, D, device=device).to(dtype)
    res = torch.randn(7, D, device=device).to(dtype)
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    y, s = fused_rms_norm(x, w, 1e-6, residual=res)
    ref_s = res + x
    assert torch.equal(s, ref_s), "the new residual must equal the reference add exactly"
    assert_close("add + rms_norm", rms_norm(ref_s, w, 1e-6).float(), y.float(), _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_weighted_branch(device, poison_empty, dtype):
    N, k, D = 3, 5, 32
    ys = torch.randn(N, k, D, device=device).to(dtype)
    bw = torch.rand(N, k, device=device)
    res = torch.randn(N, D, device=device).to(dtype)
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    y, s = fused_rms_norm(ys, w, 1e-5, residual=res, branch_weights=bw)
    branch = (ys.float() * bw[..., None]).sum(1).to(dtype)
    ref_s = res + branch
    assert_close("residual after the branch sum", ref_s.float(), s.float(), 1e-6 if dtype == torch.float32 else 1e-2)
    assert_close("branch sum + add + norm", rms_norm(ref_s, w, 1e-5).float(), y.float(), _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_tail_passthrough_from_strided_rows(device, poison_empty, dtype):
    R, Dr = 32, 8
    wide = torch.randn(4, 16 + R + Dr, device=device).to(dtype)
    ckv = wide[:, 16:]  # a column slice: rows strided, like the fused [q | kv_a] projection output
    w = (torch.rand(R, device=device) + 0.5).to(dtype)
    got = fused_rms_norm(ckv, w, 1e-6, tail=Dr)
    ref = torch.cat([rms_norm(ckv[:, :R], w, 1e-6), ckv[:, R:]], -1)
    assert got.is_contiguous() and got.shape == ref.shape
    assert torch.equal(got[:, R:], ref[:, R:])
    assert_close("norm + tail", ref.float(), got.float(), _tol(dtype))


def test_rms_norm_scatter_into_paged_cache(device, poison_empty):
    R, Dr, NB, BS = 16, 8, 3, 4
    x = torch.randn(3, R + Dr, device=device)
    w = torch.rand(R, device=device) + 0.5
    cache = torch.randn(NB, BS, R + Dr, device=device)
    before = cache.clone()
    slots = torch.tensor([9, -1, 2], dtype=torch.int64, device=device)
    y = fused_rms_norm(x, w, 1e-6, tail=Dr, scatter=(cache, slots))
    flat, ref = cache.view(-1, R + Dr), before.view(-1, R + Dr).clone()
    ref[9], ref[2] = y[0], y[2]
    assert torch.equal(flat, ref), "rows must land at their slots (negative skipped), nothing else changes"


def test_rms_norm_mixed_weight_dtype_promotes(device):
    x = torch.randn(3, 16, device=device).bfloat16()
    w = torch.rand(16, device=device) + 0.5
    got = fused_rms_norm(x, w, 1e-5)
    ref = rms_norm(x, w, 1e-5)
    assert got.dtype == ref.dtype == torch.float32
    assert_close("promoted", ref, got, 1e-5)


def test_rms_norm_rejects_bad_shapes(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError):
        fused_rms_norm(x, torch.ones(6, device=device), 1e-5)
    with pytest.raises(ValueError):
        fused_rms_norm(x, torch.ones(8, device=device), 1e-5, residual=torch.randn(2, 7, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gated_rms_norm_strided(device, poison_empty, dtype):
    N, H, K = 3, 5, 32
    o = torch.randn(N, H, K, device=device).to(dtype)
    g2 = torch.randn(2, N, H * K, device=device).to(dtype)  # gate = second half of a batched projection
    gate = g2[1].view(N, H, K)
    w = (torch.rand(K, device=device) + 0.5).to(dtype)
    got = fused_gated_rms_norm(o, gate, w, 1e-5)
    ref = gated_rms_norm(o, gate, w, 1e-5)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert_close("gated rms_norm", ref.float(), got.float(), _tol(dtype))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 300])
def test_real_shapes_bf16(N):
    dev = torch.device("cuda")
    D = 2304
    x = torch.randn(N, D, device=dev).bfloat16()
    res = torch.randn(N, D, device=dev).bfloat16()
    w = (torch.rand(D, device=dev) + 0.5).bfloat16()
    y, s = fused_rms_norm(x, w, 1e-5, residual=res)
    assert torch.equal(s, res + x)
    assert_close("decoder add + norm", rms_norm(res + x, w, 1e-5).float(), y.float(), 1e-2)
    ys = torch.randn(N, 9, D, device=dev).bfloat16()
    bw = torch.rand(N, 9, device=dev)
    y, s = fused_rms_norm(ys, w, 1e-5, residual=res, branch_weights=bw)
    ref_s = res + (ys.float() * bw[..., None]).sum(1).bfloat16()
    assert_close("moe branch + add + norm", rms_norm(ref_s, w, 1e-5).float(), y.float(), 1e-2)
    ckv = torch.randn(N, 6144 + 576, device=dev).bfloat16()[:, 6144:]
    wl = (torch.rand(512, device=dev) + 0.5).bfloat16()
    ref = torch.cat([rms_norm(ckv[:, :512], wl, 1e-6), ckv[:, 512:]], -1)
    assert_close("latent norm + tail", ref.float(), fused_rms_norm(ckv, wl, 1e-6, tail=64).float(), 1e-2)
    o = torch.randn(N, 32, 128, device=dev).bfloat16()
    gate = torch.randn(N, 32, 128, device=dev).bfloat16()
    wo = (torch.rand(128, device=dev) + 0.5).bfloat16()
    assert_close("gated norm", gated_rms_norm(o, gate, wo, 1e-5).float(),
                 fused_gated_rms_norm(o, gate, wo, 1e-5).float(), 1e-2)
