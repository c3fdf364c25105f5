"""The one-launch decode short conv (`causal_conv1d(..., decode=True)`) equals the general kernel and the
naive op: output, updated windows, untouched unused slots, padding rows, strided input rows."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.conv import naive_causal_conv1d
from kimi_linear.ops.conv.short_conv import causal_conv1d


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_general_kernel_and_naive(device, poison_empty, W, dtype):
    N, C, S = 3, 40, 8
    wide = torch.randn(N, C + 24, device=device).to(dtype)
    x = wide[:, 8:8 + C]  # strided rows, as the fused projection output gives them
    w = torch.randn(C, W, device=device).to(dtype)
    pool = torch.randn(S, W - 1, C, device=device).to(dtype)
    idx = torch.tensor([5, -1, 2], dtype=torch.int32, device=device)
    cu = torch.arange(N + 1, dtype=torch.int32, device=device)
    p_dec, p_gen, p_ref = pool.clone(), pool.clone(), pool.clone()
    y_dec = causal_conv1d(x, w, p_dec, cu, idx, activation="silu", decode=True)
    y_gen = causal_conv1d(x, w, p_gen, cu, idx, activation="silu")
    y_ref = naive_causal_conv1d(x, w, p_ref, cu, idx, activation="silu")
    assert torch.equal(y_dec, y_gen), "decode kernel and general kernel must agree bit for bit"
    assert torch.equal(p_dec, p_gen), "windows differ from the general kernel's"
    assert torch.equal(y_dec[1], torch.zeros_like(y_dec[1])), "padding row must be zero"
    assert_close("decode vs naive", y_ref.float(), y_dec.float(), 1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(p_dec, p_ref)
    untouched = [s for s in range(S) if s not in (5, 2)]
    assert torch.equal(p_dec[untouched], pool[untouched])


def test_decode_without_indices_and_bad_inputs(device):
    N, C, W = 2, 16, 4
    x = torch.randn(N, C, device=device)
    w = torch.randn(C, 1, W, device=device)
    pool = torch.randn(N, W - 1, C, device=device)
    ref_pool = pool.clone()
    cu = torch.arange(N + 1, dtype=torch.int32, device=device)
    y = causal_conv1d(x, w, pool, cu, None, decode=True)
    ref = naive_causal_conv1d(x, w, ref_pool, cu, None)
    assert_close("decode, slot n", ref, y, 1e-6)
    assert torch.equal(pool, ref_pool)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, None, cu, None, decode=True)
    with pytest.raises(ValueError):
        causal_conv1d(torch.randn(3, C, device=device), w, pool, cu, None, decode=True)


@pytest.mark.gpu
def test_gpu_decode_real_channels_graph():
    dev = torch.device("cuda")
    N, C, W, S = 4, 3 * 32 * 128, 4, 16
    x = torch.randn(N, C + 384, device=dev).bfloat16()[:, :C]
    w = torch.randn(C, W, device=dev).bfloat16()
    pool = torch.randn(S, W - 1, C, device=dev).bfloat16()
    idx = torch.tensor([3, 7, -1, 0], dtype=torch.int32, device=dev)
    cu = torch.arange(N + 1, dtype=torch.int32, device=dev)
    p_gen = pool.clone()
    y_gen = causal_conv1d(x, w, p_gen, cu, idx)
    p_dec = pool.clone()
    g = torch.cuda.CUDAGraph()
    causal_conv1d(x, w, p_dec.clone(), cu, idx, decode=True)  # compile outside the capture
    with torch.cuda.graph(g):
        y_dec = causal_conv1d(x, w, p_dec, cu, idx, decode=True)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_dec, y_gen) and torch.equal(p_dec, p_gen)
