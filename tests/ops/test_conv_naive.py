"""The reference short conv equals torch's padded depthwise conv1d, and carries its state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_close

from kimi_linear.ops.conv import naive_causal_conv1d


def torch_conv(x, w):
    # x [T, C], w [C, W] -> Conv1d(groups=C, padding=W-1) truncated to T, then SiLU
    T, C = x.shape
    y = F.conv1d(x.t()[None], w[:, None, :], padding=w.shape[1] - 1, groups=C)[0, :, :T].t()
    return F.silu(y)


def test_matches_torch_conv1d():
    x, w = torch.randn(20, 6), torch.randn(6, 4)
    assert_close("conv", torch_conv(x, w), naive_causal_conv1d(x, w), 1e-6)


def test_state_continuation_and_varlen():
    C, W = 5, 4
    w = torch.randn(C, W)
    lens = [1, 2, 9]
    full = [torch.randn(L + 6, C) for L in lens]  # each sequence: a prefix of 6, then L more tokens
    state = torch.full((5, W - 1, C), float("nan"))
    idx = torch.tensor([3, 0, 2], dtype=torch.int32)
    state[idx.long()] = 0
    # step 1: the 6-token prefixes as one varlen batch
    cu1 = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    y1 = naive_causal_conv1d(torch.cat([f[:6] for f in full]), w, state, cu1, idx)
    # step 2: the rest (lengths 1, 2, 9: shorter and longer than the window)
    cu2 = torch.tensor([0, 1, 3, 12], dtype=torch.int32)
    y2 = naive_causal_conv1d(torch.cat([f[6:] for f in full]), w, state, cu2, idx)
    for n, f in enumerate(full):
        ref = torch_conv(f, w)
        assert_close(f"prefix {n}", ref[:6], y1[cu1[n]:cu1[n + 1]], 1e-6)
        assert_close(f"rest {n}", ref[6:], y2[cu2[n]:cu2[n + 1]], 1e-6)
        assert torch.equal(state[idx[n]], f[-(W - 1):])
    assert torch.isnan(state[1]).all() and torch.isnan(state[4]).all()


def test_negative_index_is_a_padding_row():
    C, W = 4, 4
    w = torch.randn(C, W)
    state = torch.randn(3, W - 1, C)
    before = state.clone()
    x = torch.randn(2, C)
    y = naive_causal_conv1d(x, w, state, torch.tensor([0, 1, 2], dtype=torch.int32),
                            torch.tensor([-1, 2], dtype=torch.int32))
    assert torch.equal(y[0], torch.zeros(C))
    assert torch.equal(state[:2], before[:2]) and not torch.equal(state[2], before[2])
