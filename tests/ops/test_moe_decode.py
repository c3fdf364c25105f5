"""The decode-sized MoE paths: the router's GEMV logits kernel (N <= GEMV_MAX_TOKENS), shared-expert
slots appended by the router, `fused_moe` direct mode (no align launch) and `reduce=False`, and the MoE
layer with its shared expert folded into the stacked experts, summed inside the next norm kernel."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.moe import naive_moe_experts, sigmoid_grouped_topk
from kimi_linear.ops.moe.fused_moe import DIRECT_MAX_PAIRS, fused_moe
from kimi_linear.ops.moe.routing import GEMV_MAX_TOKENS, fused_sigmoid_grouped_topk


def _as_sets(w, ids):
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids.cpu(), w.cpu())]


@pytest.mark.parametrize("N", [1, GEMV_MAX_TOKENS])
@pytest.mark.parametrize("E,k,groups,topk_group", [(16, 4, 1, 1), (16, 4, 4, 2), (64, 8, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_router_gemv_path_matches_naive(device, poison_empty, N, E, k, groups, topk_group, dtype):
    D = 72  # not a power of two: masked columns
    x = torch.randn(N, D, device=device).to(dtype)
    w = torch.randn(E, D, device=device).to(dtype)
    bias = torch.randn(E, device=device) * 0.3
    rw, rids = sigmoid_grouped_topk(x, w, bias, k, groups, topk_group, True, 2.446, False)
    tw, ids = fused_sigmoid_grouped_topk(x, w, bias, k, groups, topk_group, True, 2.446, False)
    for got, ref in zip(_as_sets(tw, ids), _as_sets(rw, rids)):
        assert set(got) == set(ref)
        assert all(abs(got[e] - ref[e]) < 1e-5 for e in ref)


@pytest.mark.parametrize("N", [1, 6])
def test_router_shared_slots(device, poison_empty, N):
    E, k, D = 16, 4, 32
    x, w = torch.randn(N, D, device=device), torch.randn(E, D, device=device)
    bias = torch.randn(E, device=device) * 0.3
    rw, rids = fused_sigmoid_grouped_topk(x, w, bias, k, 1, 1, True, 2.446, False)
    tw, ids = fused_sigmoid_grouped_topk(x, w, bias, k, 1, 1, True, 2.446, False, num_shared=1)
    assert ids.shape == (N, k + 1) and tw.shape == (N, k + 1)
    assert torch.equal(ids[:, :k], rids)
    assert torch.allclose(tw[:, :k], rw, rtol=1e-6, atol=0)  # renormalised over a wider slot vector
    assert (ids[:, k] == E).all() and (tw[:, k] == 1.0).all()


@pytest.mark.parametrize("N,k", [(1, 8), (2, 4), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_unreduced_pairs(device, poison_empty, N, k, dtype):
    E, D, I = 12, 32, 24
    x = torch.randn(N, D, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, device=device) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, device=device) / I**0.5).to(dtype)
    ids = torch.rand(N, E, device=device).argsort(1)[:, :k]
    tw = torch.rand(N, k, device=device) + 0.1
    y, w = fused_moe(x, w13, w2, tw, ids, reduce=False)
    assert y.shape == (N, k, D) and torch.equal(w, tw)
    summed = (y.float() * tw[..., None]).sum(1).to(dtype)
    assert torch.equal(summed, fused_moe(x, w13, w2, tw, ids)), "the unreduced pairs must sum to the reduced output"
    ref = naive_moe_experts(x.float(), w13.float(), w2.float(), tw, ids)
    assert_close(f"pairs (direct={N * k <= DIRECT_MAX_PAIRS})", ref, summed.float(), 1e-4 if dtype == torch.float32
                 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_layer_shared_folded_through_the_norm(device, monkeypatch, dtype):
    from kimi_linear.config import ModelConfig
    from kimi_linear.layers.fused import spanning
    from kimi_linear.layers.moe import MoE
    from kimi_linear.layers.norm import RMSNorm
    from kimi_linear.tools.presets import preset_config

    config = ModelConfig.from_dict(preset_config("tiny"))
    layer = MoE(config).to(device, dtype)
    norm = RMSNorm(config.hidden_size, 1e-5).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
        layer.gate.e_score_correction_bias.normal_(0, 0.1)
    D = config.hidden_size
    x = torch.randn(1, D, device=device).to(dtype)
    res = torch.randn(1, D, device=device).to(dtype)
    with torch.no_grad():
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
        ref_h, ref_s = norm.add(layer(x), res)
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
        branch = layer(x, reduce=False)
        assert isinstance(branch, tuple), "the shared expert should be folded in (tied) and the sum deferred"
        assert branch[0].shape == (1, config.num_experts_per_token + 1, D)
        assert spanning(layer.fused_groups()["w13"]) is not None
        h, s = norm.add(branch, res)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close("stream", ref_s.float(), s.float(), tol)
    assert_close("normed", ref_h.float(), h.float(), tol)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("E", [64, 256])
def test_gpu_decode_moe_with_shared_in_a_graph(E):
    dev = torch.device("cuda")
    D, I, k = 2304, 1024, 8
    w13 = (torch.randn(E + 1, 2 * I, D, device=dev) / D**0.5).bfloat16()
    w2 = (torch.randn(E + 1, D, I, device=dev) / I**0.5).bfloat16()
    gate_w = (torch.randn(E, D, device=dev) * 0.02).bfloat16()
    bias = torch.randn(E, device=dev) * 0.01
    x = torch.randn(1, D, device=dev).bfloat16()

    def step(inp):
        tw, ids = fused_sigmoid_grouped_topk(inp, gate_w, bias, k, 1, 1, True, 2.446, False, num_shared=1)
        return fused_moe(inp, w13, w2, tw, ids, reduce=False), tw, ids

    step(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (y, w), tw, ids = step(x)
    for trial in range(3):
        x.copy_(torch.randn(1, D, device=dev).bfloat16())
        graph.replay()
        rw, rids = sigmoid_grouped_topk(x, gate_w, bias, k, 1, 1, True, 2.446, False)
        assert set(ids[0, :k].tolist()) == set(rids[0].tolist()) and ids[0, k].item() == E
        got = (y.float() * w[..., None]).sum(1)
        ref = naive_moe_experts(x.float(), w13.float(), w2.float(), tw, ids)
        assert_close(f"decode MoE + shared, replay {trial}", ref, got, 1e-2)
