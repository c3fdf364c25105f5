"""The FP8 decode GEMVs (`ops/quant/fp8_gemv.py`, `ops/moe/fused_moe_gemv.py`) against their dequantized fp32
references, with split-K on and off, per-channel and block scales, ragged N and K, repeated experts, and the
dispatch that picks them (`fp8_gemm(gemv=)`, `fused_moe(gemv=)`).

On the CPU the kernels run under Triton's interpreter at tiny shapes (forced with gemv=True: the automatic
choice takes them on CUDA only). Tolerances are the existing FP8 tests': 1e-5 relative for fp32 x, 1e-2 for
bf16 x (the output's rounding), 1.5e-2 for the bf16 MoE (h is rounded to bf16 between the GEMMs)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, fp8_experts

import kimi_linear.ops.quant.fp8_gemm as fp8_gemm_module
from kimi_linear.errors import MoEError
from kimi_linear.ops.moe import naive_moe_experts
from kimi_linear.ops.moe.fused_moe import MoETiles, fused_moe
from kimi_linear.ops.moe.fused_moe_gemv import MoEGemvTiles
from kimi_linear.ops.moe.fused_moe_gemv import gemv_tiles as moe_gemv_tiles
from kimi_linear.ops.quant import dequantize_fp8, quantize_fp8
from kimi_linear.ops.quant.fp8_gemm import fp8_gemm, use_gemv
from kimi_linear.ops.quant.fp8_gemv import _COUNTERS, fp8_gemv, gemv_tiles

# (M, N, K, tiles): tiles (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages); None = the rule
GEMV_CASES = [
    pytest.param(1, 48, 128, None, id="M1-rule"),
    pytest.param(1, 40, 100, (16, 32, 1, 4, 2), id="M1-raggedNK-nosplit"),
    pytest.param(1, 40, 100, (16, 32, 3, 4, 2), id="M1-raggedNK-split3"),
    pytest.param(3, 48, 128, (16, 32, 4, 4, 2), id="M3-split4"),
    pytest.param(3, 37, 96, (32, 64, 1, 4, 2), id="M3-raggedN-nosplit"),
    pytest.param(8, 24, 160, (8, 32, 2, 4, 2), id="M8-split2"),
]


def _weights(N, K, block, device):
    return quantize_fp8(torch.randn(N, K, device=device) / K**0.5, block)


@pytest.mark.parametrize("M,N,K,tiles", GEMV_CASES)
@pytest.mark.parametrize("block", [None, (16, 32)], ids=["channel", "block16x32"])
def test_fp8_gemv_matches_dequantized(device, poison_empty, M, N, K, tiles, block):
    q, s = _weights(N, K, block, device)
    x = torch.randn(M, K, device=device).to(torch.bfloat16)
    ref = x.double() @ dequantize_fp8(q, s, block).double().t()
    got = fp8_gemm(x, q, s, block, tiles=tiles, gemv=True)
    assert got.dtype == torch.bfloat16
    assert_close(f"fp8_gemv M={M} N={N} K={K} tiles={tiles}", ref, got, 1e-2)


@pytest.mark.parametrize("split", [1, 4])
def test_fp8_gemv_fp32_x_is_tight(device, poison_empty, split):
    """fp32 x: the sums are fp32 and the products exact, so only the summation order separates it from fp64."""
    q, s = _weights(40, 128, None, device)
    x = torch.randn(2, 128, device=device)
    ref = x.double() @ dequantize_fp8(q, s).double().t()
    assert_close(f"fp8_gemv fp32 split={split}", ref, fp8_gemv(x, q, s, tiles=(16, 32, split, 4, 2)), 1e-5)


def test_split_k_is_deterministic_and_leaves_the_counters_at_zero(device, poison_empty):
    q, s = _weights(48, 256, None, device)
    x = torch.randn(1, 256, device=device).to(torch.bfloat16)
    a = fp8_gemv(x, q, s, tiles=(16, 32, 8, 4, 2))
    b = fp8_gemv(x, q, s, tiles=(16, 32, 8, 4, 2))
    assert torch.equal(a, b)  # the partials are summed in split order
    assert int(_COUNTERS[x.device].abs().sum()) == 0
    assert_close("split-K 8 vs 1", fp8_gemv(x, q, s, tiles=(16, 32, 1, 4, 2)).float(), a.float(), 1e-2)


def test_gemv_tile_rule():
    # K tiles up to 512 wide that divide K; narrow N: split-K until 4 programs per SM (or 2 K tiles per split)
    assert gemv_tiles(1, 2304, 4096, num_sms=132) == (16, 512, 4, 4, 2)
    assert gemv_tiles(1, 2304, 9216, num_sms=132) == (16, 512, 4, 4, 2)
    assert gemv_tiles(1, 12576, 2304, num_sms=132) == (16, 256, 1, 4, 2)  # 2304 = 9 x 256
    assert gemv_tiles(1, 48, 96, block_k_max=32)[1] == 32
    assert gemv_tiles(1, 48, 100)[1] == 128  # no multiple of 16: a masked last tile
    t = moe_gemv_tiles(9, 2304, 1024)
    assert t.up == (16, 256, 1, 4, 2) and t.down == (16, 512, 1, 4, 2)  # 9 pairs x 64 / 144 column blocks
    assert moe_gemv_tiles(1, 2304, 1024).up[2] == 4  # one pair: 64 column blocks, 9 K tiles of 256


def test_fp8_gemm_dispatch(device, monkeypatch):
    """gemv=True takes the GEMV, False the MMA kernel; None the GEMV only for CUDA x of <= GEMV_MAX_M rows with
    no explicit tiles (the tiles of the MMA kernel, as before the GEMV existed)."""
    calls = []
    monkeypatch.setattr(fp8_gemm_module, "fp8_gemv", lambda *a, **k: calls.append("gemv"))
    q, s = _weights(32, 64, None, device)
    x = torch.randn(1, 64, device=device)
    fp8_gemm(x, q, s, gemv=True)
    assert calls == ["gemv"]
    fp8_gemm(x, q, s, gemv=False)
    fp8_gemm(x, q, s, tiles=(16, 16, 32, 4, 2))
    assert calls == ["gemv"]
    fp8_gemm(x, q, s)
    assert calls == ["gemv"] * (2 if x.is_cuda else 1)
    assert not use_gemv(torch.zeros(1, 8)) and not use_gemv(torch.zeros(9, 8, device=device))


# ------------------------------------------------------------------------------------------------- MoE
MOE_TILES = {"rule": None, "split": MoEGemvTiles((16, 32, 2, 4, 2), (16, 16, 3, 4, 2)),
             "nosplit": MoEGemvTiles((32, 32, 1, 4, 2), (8, 32, 1, 4, 2))}


@pytest.mark.parametrize("N,k", [(1, 1), (1, 3), (2, 4), (3, 2)], ids=["N1k1", "N1k3-repeated", "N2k4", "N3k2"])
@pytest.mark.parametrize("tiles", list(MOE_TILES), ids=list(MOE_TILES))
@pytest.mark.parametrize("block", [None, (16, 32)], ids=["channel", "block16x32"])
def test_fused_moe_gemv_matches_dequantized(device, poison_empty, N, k, tiles, block):
    E, D, I = 6, 80, 48  # D, I not multiples of the 32-wide K tiles: ragged K in both GEMVs
    q13, s13, q2, s2 = fp8_experts(E, D, I, block, device)
    x = torch.randn(N, D, device=device).to(torch.bfloat16)
    ids = torch.rand(N, E, device=device).argsort(dim=1)[:, :k]
    if k > 1:
        ids[0, -1] = ids[0, 0]  # one expert twice for the first token
    tw = torch.rand(N, k, device=device) + 0.1
    w13, w2 = dequantize_fp8(q13, s13, block), dequantize_fp8(q2, s2, block)
    ref = naive_moe_experts(x.float(), w13, w2, tw, ids)
    kw = dict(w13_scale=s13, w2_scale=s2, block=block, gemv=True, direct_tiles=MOE_TILES[tiles])
    got = fused_moe(x, q13, q2, tw, ids, **kw)
    assert got.dtype == torch.bfloat16
    assert_close(f"fused_moe gemv N={N} k={k} tiles={tiles}", ref, got, 1.5e-2)
    pairs, w = fused_moe(x, q13, q2, tw, ids, reduce=False, **kw)
    assert pairs.shape == (N, k, D) and torch.equal(w, tw)
    # the reduced output is the weighted sum of the pairs; within one bf16 ulp, not bit for bit: on CUDA the
    # reduction kernel contracts multiply and add into FMAs (measured on the H200: the last bit differs in a few
    # elements), where torch rounds the product first
    summed = (pairs.float() * tw[..., None]).sum(1)
    torch.testing.assert_close(got.float(), summed.to(x.dtype).float(), rtol=2 ** -7, atol=1e-3)


def test_fused_moe_gemv_arguments(device):
    q13, s13, q2, s2 = fp8_experts(4, 64, 32, None, device)
    x = torch.randn(1, 64, device=device).to(torch.bfloat16)
    ids, tw = torch.tensor([[0, 2]], device=device), torch.rand(1, 2, device=device)
    kw = dict(w13_scale=s13, w2_scale=s2)
    with pytest.raises(MoEError, match="gemv=True"):  # the GEMVs serve weight-only direct mode only
        fused_moe(x, q13, q2, tw, ids, act_fp8=True, gemv=True, **kw)
    with pytest.raises(MoEError, match="MoEGemvTiles"):
        fused_moe(x, q13, q2, tw, ids, gemv=True, direct_tiles=MoETiles(16, (32, 64, 4, 2), (32, 64, 4, 2)), **kw)
    with pytest.raises(MoEError, match="MoEGemvTiles"):
        fused_moe(x, q13, q2, tw, ids, gemv=False, direct_tiles=MOE_TILES["split"], **kw)
    # the MMA kernels and the GEMVs agree
    assert_close("gemv vs mma", fused_moe(x, q13, q2, tw, ids, gemv=False, **kw).float(),
                 fused_moe(x, q13, q2, tw, ids, gemv=True, **kw), 1e-2)
