"""The post-attention norm and the router in one launch (`ops/moe/norm_router.py`) vs the two kernels it
replaces (`fused_rms_norm` with the residual, then `fused_sigmoid_grouped_topk`) and the naive router:
h and the residual bit for bit, the same experts and weights; groups, bias, biased weights, shared slots,
N = 0 .. GEMV_MAX_TOKENS; the split counter left at zero; bad shapes named. CPU: Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.moe import norm_select_experts, sigmoid_grouped_topk
from kimi_linear.ops.moe.norm_router import fused_norm_select_experts
from kimi_linear.ops.moe.routing import GEMV_MAX_TOKENS, fused_sigmoid_grouped_topk
from kimi_linear.ops.norm.rmsnorm import fused_rms_norm
from kimi_linear.ops.quant.fp8_gemv import split_k_counters


def _inputs(N, D, E, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    branch = torch.randn(N, D, generator=g).to(dtype).to(device)
    residual = (3 * torch.randn(N, D, generator=g)).to(dtype).to(device)
    nw = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype).to(device)
    gw = torch.randn(E, D, generator=g).to(dtype).to(device)
    bias = (0.3 * torch.randn(E, generator=g)).to(device)
    return branch, residual, nw, gw, bias


CASES = [  # E, k, groups, topk_group, biased weights, shared slots
    pytest.param(16, 4, 1, 1, False, 0, id="E16-k4"),
    pytest.param(16, 4, 4, 2, False, 1, id="groups-shared"),
    pytest.param(64, 8, 8, 4, True, 1, id="E64-biased"),
]


@pytest.mark.parametrize("N", [1, 3, GEMV_MAX_TOKENS])
@pytest.mark.parametrize("E,k,groups,topk_group,biased,shared", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_launch_equals_the_two_kernels(device, poison_empty, N, E, k, groups, topk_group, biased, shared,
                                           dtype):
    D, eps, scaling = 72, 1e-6, 2.446  # 72: masked lanes
    branch, residual, nw, gw, bias = _inputs(N, D, E, dtype, device)
    route = (k, groups, topk_group, True, scaling, biased)
    h, r, tw, ids = fused_norm_select_experts(branch, residual, nw, eps, gw, bias, *route, num_shared=shared)
    h_ref, r_ref = fused_rms_norm(branch, nw, eps, residual=residual)
    assert torch.equal(h, h_ref) and torch.equal(r, r_ref), "the norm must be the norm kernel's, bit for bit"
    tw_ref, ids_ref = fused_sigmoid_grouped_topk(h_ref, gw, bias, *route, num_shared=shared)
    assert torch.equal(ids, ids_ref)
    assert torch.allclose(tw, tw_ref, rtol=1e-6, atol=1e-7)
    nw_, nids = sigmoid_grouped_topk(h_ref, gw, bias, *route, num_shared=shared)  # the naive router, as sets
    for n in range(N):
        assert set(ids[n].tolist()) == set(nids[n].tolist())
    assert int(split_k_counters(torch.device(device), 1)[0]) == 0, "the last program resets the counter"


def test_public_entry_dispatches_by_batch(device, poison_empty, monkeypatch):
    """`norm_select_experts`: the one-launch kernel up to GEMV_MAX_TOKENS tokens, norm + router beyond;
    both give the norm kernel's h and the router's choice."""
    import kimi_linear.ops.moe.norm_router as nr

    calls = []
    real = nr.fused_norm_select_experts
    monkeypatch.setattr(nr, "fused_norm_select_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for N in (2, GEMV_MAX_TOKENS + 3):
        branch, residual, nw, gw, bias = _inputs(N, 40, 16, torch.float32, device, seed=N)
        h, r, tw, ids = norm_select_experts(branch, residual, nw, 1e-5, gw, bias, 4, num_shared=1)
        h_ref, r_ref = fused_rms_norm(branch, nw, 1e-5, residual=residual)
        assert torch.equal(r, r_ref) and torch.allclose(h, h_ref, rtol=1e-6, atol=1e-6)
        _, ids_ref = sigmoid_grouped_topk(h_ref, gw, bias, 4, num_shared=1)
        assert [set(i) for i in ids.tolist()] == [set(i) for i in ids_ref.tolist()]
    assert calls == ([1] if device == "cuda" or _kernels_on_cpu() else [])


def _kernels_on_cpu() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("KIMI_LINEAR_TRITON_ON_CPU") == "1"


def test_empty_batch_and_bad_shapes(device):
    branch, residual, nw, gw, bias = _inputs(0, 24, 8, torch.float32, device)
    h, r, tw, ids = fused_norm_select_experts(branch, residual, nw, 1e-6, gw, bias, 2)
    assert h.shape == (0, 24) and tw.shape == (0, 2) and ids.shape == (0, 2)
    branch, residual, nw, gw, bias = _inputs(2, 24, 8, torch.float32, device)
    with pytest.raises(ValueError, match="residual"):
        fused_norm_select_experts(branch, residual[:, :12], nw, 1e-6, gw, bias, 2)
    with pytest.raises(ValueError, match=r"N <= \d+"):
        big = torch.zeros(GEMV_MAX_TOKENS + 1, 24, device=device)
        fused_norm_select_experts(big, big, nw, 1e-6, gw, bias, 2)
    with pytest.raises(ValueError, match="top_k"):
        fused_norm_select_experts(branch, residual, nw, 1e-6, gw, bias, 9)


def test_autograd_takes_the_differentiable_forms(device, monkeypatch):
    """Under autograd the one-launch kernel (no backward) is never called: the norm's training form and the
    router run, and the gradient reaches the branch."""
    import kimi_linear.ops.moe.norm_router as nr

    monkeypatch.setattr(nr, "fused_norm_select_experts", lambda *a, **kw: pytest.fail("kernel under autograd"))
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    branch, residual, nw, gw, bias = _inputs(2, 32, 8, torch.float32, device)
    branch.requires_grad_(True)
    h, r, tw, ids = norm_select_experts(branch, residual, nw, 1e-6, gw, bias, 2)
    h.sum().backward()
    assert branch.grad is not None and torch.isfinite(branch.grad).all()
