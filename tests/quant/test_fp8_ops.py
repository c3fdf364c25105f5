"""FP8 ops: quantize / dequantize, the FP8-weight GEMM and the FP8 fused MoE against their dequantized fp32
references, the MLA decode kernel over an fp8 latent cache.

On the CPU the Triton kernels run under the interpreter (which supports float8_e4m3fn loads, stores and
dots) at tiny shapes; the layouts covered are per-channel and block-wise (with partial blocks)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, fp8_experts

from kimi_linear.ops.moe import naive_moe_experts
from kimi_linear.ops.moe.fused_moe import fused_moe
from kimi_linear.ops.quant import FP8, dequantize_fp8, quantize_fp8, quantize_per_token
from kimi_linear.ops.quant.fp8_gemm import fp8_gemm


def test_quantize_roundtrip_and_layouts():
    w = torch.randn(40, 70) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different sizes
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and s.shape == (40, 1) and s.dtype == torch.float32
    assert float(q.float().abs().amax(-1).min()) == 448.0  # each row uses the full range
    assert (dequantize_fp8(q, s) - w).abs().max() <= (w.abs().amax(-1, keepdim=True) / 16).max()
    qb, sb = quantize_fp8(w, (16, 32))
    assert sb.shape == (3, 3)  # ceil(40 / 16), ceil(70 / 32): partial blocks
    err_b = (dequantize_fp8(qb, sb, (16, 32)) - w).norm() / w.norm()
    err_c = (dequantize_fp8(q, s) - w).norm() / w.norm()
    assert err_c < 0.05 and err_b < 0.05
    xq, xs = quantize_per_token(w)
    assert xs.shape == (40, 1) and ((xq.float() * xs - w).norm() / w.norm()) < 0.05
    assert torch.equal(quantize_fp8(torch.zeros(3, 8))[0].float(), torch.zeros(3, 8))  # no 0 / 0


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("block", [None, (16, 32)], ids=["channel", "block16x32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_gemm_matches_dequantized(device, poison_empty, M, block, dtype):
    N, K = 48, 96
    q, s = quantize_fp8(torch.randn(N, K, device=device) / K**0.5, block)
    x = torch.randn(M, K, device=device).to(dtype)
    ref = x.double() @ dequantize_fp8(q, s, block).double().t()
    got = fp8_gemm(x, q, s, block)
    assert got.dtype == dtype
    assert_close(f"fp8_gemm M={M}", ref, got, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("N,act_fp8", [(1, None), (2, None), (40, None), (40, False), (3, True)],
                         ids=["direct", "direct2", "sorted-a8", "sorted-w8a16", "direct-a8"])
@pytest.mark.parametrize("block", [None, (32, 32)], ids=["channel", "block32"])
def test_fused_moe_fp8_matches_dequantized(device, poison_empty, N, act_fp8, block):
    E, D, I, k = 8, 64, 32, 2
    q13, s13, q2, s2 = fp8_experts(E, D, I, block, device)
    x = torch.randn(N, D, device=device).to(torch.bfloat16)
    ids = torch.rand(N, E, device=device).argsort(dim=1)[:, :k]
    tw = torch.rand(N, k, device=device) + 0.1
    w13, w2 = dequantize_fp8(q13, s13, block), dequantize_fp8(q2, s2, block)
    ref = naive_moe_experts(x.float(), w13, w2, tw, ids)
    got = fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, block=block, act_fp8=act_fp8)
    if not (act_fp8 or (act_fp8 is None and N > 8)):
        assert_close("fused_moe fp8 (weight-only)", ref, got, 1.5e-2)
        return
    # activations quantized per token (a8): the kernel against the same quantization of x and of h done in
    # fp32 (tight: only bf16 rounding and the odd e4m3 tie flipped by it differ), and a looser sanity bound
    # against unquantized activations (e4m3's 3 mantissa bits on x and h: a few percent on small samples)
    assert_close("fused_moe fp8 a8 vs emulated", _a8_reference(x, w13, w2, tw, ids), got, 2.5e-2)
    assert_close("fused_moe fp8 a8 vs unquantized activations", ref, got, 1e-1)


def _a8_reference(x, w13, w2, tw, ids):
    """The a8 path in fp32: x quantized per token, h = silu(gate) * up rounded to x's dtype and quantized per
    row, then the down GEMM; the k-way weighted sum."""
    I = w2.shape[-1]
    xq, xs = quantize_per_token(x)
    xd = xq.float() * xs
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            g = xd[n] @ w13[e].float().t()
            h = (torch.nn.functional.silu(g[:I]) * g[I:]).to(x.dtype)
            hq, hs = quantize_per_token(h[None])
            out[n] += float(tw[n, j]) * ((hq.float() * hs)[0] @ w2[e].float().t()).double()
    return out.to(x.dtype)


def test_fused_moe_fp8_rejects_bad_scales(device):
    q13, s13, q2, s2 = fp8_experts(4, 64, 32, None, device)
    x = torch.randn(1, 64, device=device).to(torch.bfloat16)
    ids, tw = torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, device=device)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, q13, q2, tw, ids, w13_scale=s13[:, :5], w2_scale=s2)
    with pytest.raises(ValueError, match="w2_scale"):
        fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=None)


@pytest.mark.parametrize("dual_load", [False, True], ids=["one-load", "dual-load"])
def test_mla_decode_reads_an_fp8_cache(dual_load, device, poison_empty):
    from kimi_linear.ops.mla import naive_mla_decode
    from kimi_linear.ops.mla.decode import mla_decode

    H, Dn, Dr, Dv, R, BS, NB = 4, 16, 16, 16, 32, 16, 8
    cache = torch.randn(NB, BS, R + Dr, device=device).to(FP8)
    q = torch.randn(2, H, Dn + Dr, device=device)
    w = torch.randn(H * (Dn + Dv), R, device=device) / R**0.5
    tables = torch.tensor([[3, 1, 5, 0], [2, 7, 4, 6]], dtype=torch.int32, device=device)
    lens = torch.tensor([37, 64], dtype=torch.int32, device=device)
    ref = naive_mla_decode(q, cache, tables, lens, w, Dv, 0.1)
    got = mla_decode(q, cache, tables, lens, w, Dv, 0.1, num_splits=3, min_chunk=16, block_n=16, dual_load=dual_load)
    assert_close("mla decode over fp8", ref, got, 1e-4)
    assert_close("fp8 vs fp32 cache", ref, naive_mla_decode(q, cache.float(), tables, lens, w, Dv, 0.1), 1e-6)


def test_explicit_tiles_give_the_same_results(device):
    """fp8_gemm(tiles=) and fused_moe(direct_tiles=) (what benchmarks/fp8_tiles.py sweeps) compute the same."""
    from kimi_linear.ops.moe.fused_moe import MoETiles

    N, K = 48, 128
    q, s = quantize_fp8(torch.randn(N, K, device=device) / K**0.5)
    x = torch.randn(1, K, device=device)
    assert_close("fp8_gemm with explicit tiles", fp8_gemm(x, q, s), fp8_gemm(x, q, s, tiles=(16, 32, 64, 4, 2)), 1e-6)
    q13, s13, q2, s2 = fp8_experts(4, 64, 32, None, device)
    xm = torch.randn(1, 64, device=device).to(torch.bfloat16)
    ids, tw = torch.tensor([[0, 2]], device=device), torch.rand(1, 2, device=device)
    base = fused_moe(xm, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)
    tiles = MoETiles(16, (16, 64, 4, 2), (32, 32, 4, 2), 1)
    assert_close("fused_moe with explicit direct tiles", base.float(),
                 fused_moe(xm, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, direct_tiles=tiles), 1e-2)
