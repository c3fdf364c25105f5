"""Fused MoE (Triton): experts vs `naive_moe_experts` and a per-token fp64 loop, the device-side sort,
the fused router vs `sigmoid_grouped_topk`, the layer dispatch; on the GPU the real shape, no host
syncs, and CUDA-graph capture/replay with changing routing.

On CPU the kernels run under the Triton interpreter at tiny shapes (`tests/triton_interpreter.py` makes its
fp32 -> bf16 casts round to nearest like the GPU, so bf16 errors measure the kernels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from kimi_linear.ops.moe import naive_moe_experts, sigmoid_grouped_topk
from kimi_linear.ops.moe import fused_moe as fm
from kimi_linear.ops.moe.fused_moe import MoETiles, fused_moe, moe_align, pick_tiles
from kimi_linear.ops.moe.routing import fused_sigmoid_grouped_topk


def make_experts(E, D, I, dtype, device):
    w13 = (torch.randn(E, 2 * I, D, device=device) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, device=device) / I**0.5).to(dtype)
    return w13, w2


def random_routing(N, E, k, device, distinct=True):
    """ids [N, k] (distinct experts per token when possible), weights [N, k] fp32 in (0.1, 1.1)."""
    if distinct and k <= E:
        ids = torch.rand(N, E, device=device).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (N, k), device=device)
    return torch.rand(N, k, device=device) + 0.1, ids


def per_token_loop(x, w13, w2, tw, ids):
    """fp64 oracle, one token and one slot at a time."""
    I = w2.shape[-1]
    x, w13, w2, tw = x.double(), w13.double(), w2.double(), tw.double()
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            h = F.silu(w13[e, :I] @ x[n]) * (w13[e, I:] @ x[n])
            out[n] += tw[n, j] * (w2[e] @ h)
    return out


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------------ experts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 3, 64, 300])
@pytest.mark.parametrize("E,k,distinct", [(4, 1, True), (16, 2, True), (64, 8, True), (4, 8, False)],
                         ids=["E4-k1", "E16-k2", "E64-k8", "E4-k8-repeats"])
def test_fused_moe_matches_naive(device, poison_empty, dtype, N, E, k, distinct):
    D, I = 32, 24
    x = torch.randn(N, D, device=device).to(dtype)
    w13, w2 = make_experts(E, D, I, dtype, device)
    tw, ids = random_routing(N, E, k, device, distinct)
    got = fused_moe(x, w13, w2, tw, ids)
    assert got.dtype == dtype and got.shape == (N, D)
    ref = naive_moe_experts(x.float(), w13.float(), w2.float(), tw, ids)
    assert_close("fused vs naive (fp32 oracle)", ref, got.float(), TOL[dtype])
    if dtype == torch.bfloat16:
        assert_close("fused vs naive bf16", naive_moe_experts(x, w13, w2, tw, ids).float(), got.float(), TOL[dtype])
    if N <= 64:
        assert_close("fused vs per-token loop", per_token_loop(x, w13, w2, tw, ids), got.double(), TOL[dtype])


@pytest.mark.parametrize("pattern", ["few_experts", "one_expert", "same_row", "expert_repeated_in_token"])
def test_idle_experts_and_duplicated_routing(device, poison_empty, pattern):
    N, E, k, D, I = 40, 16, 4, 32, 16
    x = torch.randn(N, D, device=device)
    w13, w2 = make_experts(E, D, I, torch.float32, device)
    tw = torch.rand(N, k, device=device) + 0.1
    if pattern == "few_experts":  # 13 of 16 experts receive no token
        ids = torch.tensor([3, 9, 15], device=device)[torch.randint(0, 3, (N, k), device=device)]
    elif pattern == "one_expert":
        ids = torch.full((N, k), 7, device=device)
    elif pattern == "same_row":
        ids = torch.tensor([[5, 0, 11, 2]], device=device).expand(N, k).contiguous()
    else:
        ids = torch.tensor([[1, 1, 4, 1]], device=device).repeat(N, 1)
    got = fused_moe(x, w13, w2, tw, ids)
    assert_close("fused vs per-token loop", per_token_loop(x, w13, w2, tw, ids), got.double(), 1e-4)


@pytest.mark.parametrize("tiles", [MoETiles(16, (16, 16, 4, 2), (16, 16, 4, 2), 1),
                                   MoETiles(32, (32, 16, 4, 2), (16, 32, 4, 2), 4),
                                   MoETiles(64, (16, 32, 4, 2), (32, 16, 4, 2), 2)],
                         ids=["m16", "m32-group4", "m64-group2"])
@pytest.mark.parametrize("multi_program_align", [False, True], ids=["align1", "alignN"])
def test_tiles_and_align_paths(device, poison_empty, monkeypatch, tiles, multi_program_align):
    """Uneven D, I against the tiles (masked K and N tails), grouped tile order, both sort paths."""
    if multi_program_align:
        monkeypatch.setattr(fm, "SINGLE_PROGRAM_MAX_PAIRS", 1)
        monkeypatch.setattr(fm, "_ALIGN_BLOCK", 128)
    N, E, k, D, I = 150, 8, 3, 40, 20
    x = torch.randn(N, D, device=device)
    w13, w2 = make_experts(E, D, I, torch.float32, device)
    tw, ids = random_routing(N, E, k, device)
    got = fused_moe(x, w13, w2, tw, ids, tiles=tiles)
    assert_close("fused vs naive", naive_moe_experts(x, w13, w2, tw, ids), got, 1e-4)


@pytest.mark.parametrize("multi_program", [False, True], ids=["one_program", "multi_program"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_is_a_padded_counting_sort(device, monkeypatch, multi_program, block_m):
    if multi_program:
        monkeypatch.setattr(fm, "SINGLE_PROGRAM_MAX_PAIRS", 1)
        monkeypatch.setattr(fm, "_ALIGN_BLOCK", 128)
    N, k, E = 70, 3, 12
    ids = torch.randint(0, E - 2, (N, k), device=device)  # the last two experts stay idle
    sorted_pairs, start, count = moe_align(ids, E, block_m)
    flat = ids.reshape(-1).cpu()
    start, count, sorted_pairs = start.cpu(), count.cpu(), sorted_pairs.cpu()
    assert count.tolist() == torch.bincount(flat, minlength=E).tolist()
    assert int(start[0]) == 0 and (start % block_m == 0).all()
    padded = (count + block_m - 1) // block_m * block_m
    assert (start[1:] - start[:-1] == padded).all()
    assert int(start[-1]) <= sorted_pairs.numel()
    seen = []
    for e in range(E):
        rows = sorted_pairs[int(start[e]):int(start[e]) + int(count[e])]
        assert (flat[rows.long()] == e).all(), f"expert {e} holds pairs of other experts"
        seen += rows.tolist()
    assert sorted(seen) == list(range(N * k)), "every pair appears exactly once"


def test_pick_tiles_regimes():
    assert pick_tiles(8, 64).block_m == 16  # decode
    assert pick_tiles(16384 * 8, 64).block_m == 128  # prefill


def test_shape_errors(device):
    x = torch.randn(3, 8, device=device)
    w13, w2 = make_experts(4, 8, 6, torch.float32, device)
    tw, ids = random_routing(3, 4, 2, device)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_moe(x, w13, w2[:, :, :5], tw, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, tw[:2], ids[:2])
    with pytest.raises(ValueError, match="dtype"):
        fused_moe(x.double(), w13, w2, tw, ids)


# ------------------------------------------------------------------------------------------- router
def _as_sets(w, ids):
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids.cpu(), w.cpu())]


@pytest.mark.parametrize("E,k,groups,topk_group", [(16, 4, 1, 1), (16, 4, 4, 2), (12, 3, 3, 1), (8, 1, 2, 2),
                                                   (64, 8, 1, 1)])
@pytest.mark.parametrize("biased", [False, True], ids=["unbiased_weights", "biased_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_router_matches_naive(device, poison_empty, E, k, groups, topk_group, biased, dtype):
    N, D = 11, 40
    x = torch.randn(N, D, device=device).to(dtype)
    w = torch.randn(E, D, device=device).to(dtype)
    bias = torch.randn(E, device=device) * 0.3
    rw, rids = sigmoid_grouped_topk(x, w, bias, k, groups, topk_group, True, 2.446, biased)
    tw, ids = fused_sigmoid_grouped_topk(x, w, bias, k, groups, topk_group, True, 2.446, biased)
    assert tw.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (N, k)
    for n, (got, ref) in enumerate(zip(_as_sets(tw, ids), _as_sets(rw, rids))):
        assert set(got) == set(ref), f"token {n}: experts {sorted(got)} != {sorted(ref)}"
        for e in ref:
            assert abs(got[e] - ref[e]) < 1e-5, f"token {n} expert {e}: weight {got[e]} != {ref[e]}"


@pytest.mark.parametrize("N", [1, 3, 9], ids=["gemv-1", "gemv-3", "batched"])
def test_fused_router_breaks_exact_ties_by_the_smallest_id(device, N):
    """Equal gate rows give bit-equal scores: the picks come best first and, among equal scores, by the
    smallest expert id (the top-k packs the score's order-preserving bits above the id's complement), with
    and without a correction bias, for positive and negative logits."""
    E, D, k = 32, 24, 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, D, generator=g)
    w[[3, 17, 30]] = w[9].clone()  # four equal rows, near the top for every token
    w[[5, 21]] = -w[9].clone()  # and two equal rows at the bottom
    x = (w[9] + 0.3 * torch.randn(N, D, generator=g)) * 0.1
    w, x = w.to(device), x.to(device)
    for bias in (None, torch.zeros(E, device=device)):
        tw, ids = fused_sigmoid_grouped_topk(x, w, bias, k, 1, 1, False, 1.0, False)
        scores = torch.sigmoid(x.float() @ w.float().T)
        for n in range(N):
            want = sorted(range(E), key=lambda e: (-scores[n, e].item(), e))[:k]
            assert {3, 9, 17, 30} <= set(want), "the tied rows should be picked"
            assert ids[n].tolist() == want, (ids[n].tolist(), want)
            assert torch.allclose(tw[n], scores[n, ids[n]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_router_without_bias(device, renormalize):
    x, w = torch.randn(5, 24, device=device), torch.randn(8, 24, device=device)
    rw, rids = sigmoid_grouped_topk(x, w, None, 2, renormalize=renormalize, scaling=1.5)
    tw, ids = fused_sigmoid_grouped_topk(x, w, None, 2, renormalize=renormalize, scaling=1.5)
    for got, ref in zip(_as_sets(tw, ids), _as_sets(rw, rids)):
        assert set(got) == set(ref)
        assert all(abs(got[e] - ref[e]) < 1e-5 for e in ref)


# -------------------------------------------------------------------------------------------- layer
def test_moe_layer_kernel_path_matches_naive(device, monkeypatch):
    from kimi_linear.config import ModelConfig
    from kimi_linear.layers.moe import MoE
    from kimi_linear.tools.presets import preset_config

    config = ModelConfig.from_dict(preset_config("tiny"))
    layer = MoE(config).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 5, config.hidden_size, device=device)
    with torch.no_grad():
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
        got = layer(x)
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
        if device.type == "cuda":
            tw, ids = sigmoid_grouped_topk(x.reshape(-1, x.shape[-1]), layer.gate.weight,
                                           layer.gate.e_score_correction_bias, config.num_experts_per_token,
                                           config.num_expert_group, config.topk_group, config.moe_renormalize,
                                           config.routed_scaling_factor, config.moe_biased_weights)
            h = x.reshape(-1, x.shape[-1])
            ref = naive_moe_experts(h, layer.experts.w13_weight, layer.experts.w2_weight, tw, ids)
            ref = (ref + layer.shared_experts(h)).view(x.shape)
        else:
            ref = layer(x)
    assert got.shape == x.shape
    assert_close("MoE layer kernels vs naive", ref, got, 1e-4)


# ---------------------------------------------------------------------------------------------- GPU
REAL = dict(D=2304, I=1024, k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [64, 256])
@pytest.mark.parametrize("N", [1, 16, 300])
def test_real_shape_bf16(E, N):
    dev = torch.device("cuda")
    D, I, k = REAL["D"], REAL["I"], REAL["k"]
    x = torch.randn(N, D, device=dev).bfloat16()
    w13, w2 = make_experts(E, D, I, torch.bfloat16, dev)
    tw, ids = random_routing(N, E, k, dev)
    got = fused_moe(x, w13, w2, tw, ids)
    ref = naive_moe_experts(x.float(), w13.float(), w2.float(), tw, ids)
    assert_close("fused vs fp32 oracle", ref, got.float(), 1e-2)
    assert_close("fused vs naive bf16", naive_moe_experts(x, w13, w2, tw, ids).float(), got.float(), 1e-2)


@pytest.mark.gpu
def test_real_router_bf16():
    dev = torch.device("cuda")
    N, D, E, k = 300, REAL["D"], 256, REAL["k"]
    x = torch.randn(N, D, device=dev).bfloat16()
    w = (torch.randn(E, D, device=dev) * 0.02).bfloat16()
    bias = torch.randn(E, device=dev) * 0.01
    rw, rids = sigmoid_grouped_topk(x, w, bias, k, 1, 1, True, 2.446, False)
    tw, ids = fused_sigmoid_grouped_topk(x, w, bias, k, 1, 1, True, 2.446, False)
    agree = 0
    for got, ref in zip(_as_sets(tw, ids), _as_sets(rw, rids)):
        if set(got) == set(ref):  # a near-tie may flip with the summation order; count those
            agree += 1
            assert max(abs(got[e] - ref[e]) for e in ref) < 1e-5
    assert agree >= N - 3, f"only {agree}/{N} tokens route identically"


@pytest.mark.gpu
def test_no_host_sync_and_cuda_graph_replay():
    dev = torch.device("cuda")
    N, E, D, I, k = 16, 64, REAL["D"], REAL["I"], REAL["k"]
    w13, w2 = make_experts(E, D, I, torch.bfloat16, dev)
    gate_w = (torch.randn(E, D, device=dev) * 0.02).bfloat16()
    bias = torch.randn(E, device=dev) * 0.01
    x = torch.randn(N, D, device=dev).bfloat16()

    def step(inp):
        tw, ids = fused_sigmoid_grouped_topk(inp, gate_w, bias, k, 1, 1, True, 2.446, False)
        return fused_moe(inp, w13, w2, tw, ids), tw, ids

    step(x)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_tw, static_ids = step(static_x)
    patterns = set()
    for trial in range(3):  # new inputs -> new routing patterns, same graph
        static_x.copy_(torch.randn(N, D, device=dev).bfloat16() * (1 + trial))
        graph.replay()
        tw, ids = fused_sigmoid_grouped_topk(static_x, gate_w, bias, k, 1, 1, True, 2.446, False)
        assert torch.equal(ids, static_ids) and torch.equal(tw, static_tw)
        patterns.add(tuple(ids.flatten().tolist()))
        ref = naive_moe_experts(static_x, w13, w2, static_tw, static_ids)
        assert_close(f"graph replay {trial}", ref.float(), static_y.float(), 1e-2)
    assert len(patterns) == 3, "the replays should have seen different routings"
