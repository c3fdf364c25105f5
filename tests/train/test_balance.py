"""The aux-loss-free bias update: sign of (mean load - load) times the rate, outside autograd; imbalance."""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.train.balance import ExpertLoad, imbalance


class _Router(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)


class _MoE(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.gate = _Router(E)
        self.tokens_per_expert = None


def test_bias_moves_against_the_load():
    model = nn.ModuleDict({"a": _MoE(4), "b": _MoE(4)})
    load = ExpertLoad(model)
    assert len(load.modules) == 2
    model["a"].tokens_per_expert = torch.tensor([6.0, 2.0, 0.0, 0.0])
    model["b"].tokens_per_expert = torch.tensor([2.0, 2.0, 2.0, 2.0])
    load.accumulate()
    model["a"].tokens_per_expert = torch.tensor([2.0, 2.0, 4.0, 0.0])
    load.accumulate()
    counts = load.reduce()
    assert counts[0].tolist() == [8.0, 4.0, 4.0, 0.0]
    load.update_bias(counts, 0.01)
    # mean 4: expert 0 overloaded (down), 1 and 2 exact (unchanged), 3 underloaded (up)
    torch.testing.assert_close(model["a"].gate.e_score_correction_bias, torch.tensor([-0.01, 0.0, 0.0, 0.01]))
    assert model["b"].gate.e_score_correction_bias.tolist() == [0.0] * 4
    assert imbalance(counts) == [2.0, 1.0]
    assert load.reduce() == []  # reset
