"""Router (sigmoid, correction bias, grouped top-k, both weight conventions) and SwiGLU experts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from kimi_linear.ops.moe import naive_moe_experts, sigmoid_grouped_topk


def brute_force_route(x, w, bias, top_k, groups, topk_group, renorm, scaling, biased):
    """Per token: enumerate group subsets, pick the best by group score, then the top-k experts."""
    N, E = x.shape[0], w.shape[0]
    per = E // groups
    out_w, out_ids = [], []
    for n in range(N):
        s = torch.sigmoid(x[n].double() @ w.double().t())
        c = s + bias.double()
        gs = [sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(groups)]
        gs = [sum(v) for v in gs]
        best = max(itertools.combinations(range(groups), topk_group), key=lambda sub: sum(gs[i] for i in sub))
        allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
        ids = sorted(allowed, key=lambda e: -c[e].item())[:top_k]
        ww = torch.stack([(c if biased else s)[e] for e in ids])
        if renorm:
            ww = ww / ww.sum()
        out_w.append(ww * scaling)
        out_ids.append(ids)
    return torch.stack(out_w), torch.tensor(out_ids)


@pytest.mark.parametrize("E,k,groups,topk_group", [(8, 2, 1, 1), (16, 4, 4, 2), (12, 3, 3, 1), (8, 1, 2, 2)])
@pytest.mark.parametrize("biased", [False, True], ids=["unbiased_weights", "biased_weights"])
def test_router_matches_brute_force(E, k, groups, topk_group, biased):
    N, D = 9, 16
    x = torch.randn(N, D)
    w = torch.randn(E, D)
    bias = torch.randn(E) * 0.3
    tw, ids = sigmoid_grouped_topk(x, w, bias, k, groups, topk_group, True, 2.5, biased)
    rw, rids = brute_force_route(x, w, bias, k, groups, topk_group, True, 2.5, biased)
    # compare as sets per token (the op returns unsorted ids)
    for n in range(N):
        got = dict(zip(ids[n].tolist(), tw[n].tolist()))
        ref = dict(zip(rids[n].tolist(), rw[n].tolist()))
        assert set(got) == set(ref), f"token {n}: experts {sorted(got)} != {sorted(ref)}"
        for e in ref:
            assert abs(got[e] - ref[e]) < 1e-5


def test_experts_match_per_token_loop():
    N, D, I, E, k = 7, 16, 8, 5, 2
    x = torch.randn(N, D)
    w13 = torch.randn(E, 2 * I, D)
    w2 = torch.randn(E, D, I)
    tw = torch.rand(N, k)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    y = naive_moe_experts(x, w13, w2, tw, ids)
    ref = torch.zeros(N, D)
    for n in range(N):
        for j in range(k):
            e = ids[n, j]
            h = F.silu(w13[e, :I] @ x[n]) * (w13[e, I:] @ x[n])
            ref[n] += tw[n, j] * (w2[e] @ h)
    assert_close("moe", ref, y, 1e-5)
