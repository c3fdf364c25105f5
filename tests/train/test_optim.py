"""Muon (Newton-Schulz orthogonalised momentum, Moonshot's update RMS) and the optimizer groups; schedules."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_linear.models import KimiLinearForCausalLM
from kimi_linear.tools.presets import preset_config
from kimi_linear.config import ModelConfig
from kimi_linear.train.muon import Muon, muon_lr_scale, newton_schulz
from kimi_linear.train.optim import build_optimizer, param_groups
from kimi_linear.train.schedule import lr_factor


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32), (3, 24, 40)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(shape)
    o = newton_schulz(g).float()
    m, n = shape[-2:]
    # singular values of NS5's output lie near 1 (the quintic's band is roughly [0.7, 1.2])
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    # the RMS of an orthogonal [m, n] matrix is 1 / sqrt(max(m, n))
    rms = o.pow(2).mean().sqrt().item()
    assert abs(rms - 1 / math.sqrt(max(m, n))) < 0.25 / math.sqrt(max(m, n))


def test_muon_update_rms_matches_moonshot():
    """One Muon step (no weight decay) moves a [m, n] matrix by lr * 0.2 * sqrt(max(m, n)) * NS5(g): RMS ~ 0.2 lr."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 256))
    w0 = w.detach().clone()
    w.grad = torch.randn(64, 256)
    opt = Muon([{"params": [w], "use_muon": True, "weight_decay": 0.0}], lr=1e-2, momentum=0.95)
    opt.step()
    delta = (w.detach() - w0)
    expect = -1e-2 * muon_lr_scale(w.shape) * newton_schulz(w.grad.add(w.grad, alpha=0.95))
    torch.testing.assert_close(delta, expect, rtol=1e-4, atol=1e-6)  # w + delta rounds in fp32
    assert abs(delta.pow(2).mean().sqrt().item() / 1e-2 - 0.2) < 0.05


def test_muon_adamw_groups_equal_torch_adamw():
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "use_muon": False, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_muon_splits_expert_stacks_into_w1_w3():
    """An [E, 2I, D] stack is orthogonalised as 2E matrices [I, D]."""
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(2, 8, 12))
    w.grad = torch.randn(2, 8, 12)
    opt = Muon([{"params": [w], "use_muon": True, "weight_decay": 0.0, "split": 2, "nesterov": False}], lr=1.0)
    opt.step()
    u = w.grad
    expect = -muon_lr_scale(w.shape, 2) * newton_schulz(u.reshape(2, 2, 4, 12)).reshape(2, 8, 12)
    torch.testing.assert_close(w.detach(), expect)


def test_param_groups_by_name():
    config = ModelConfig.from_dict(preset_config("tiny"))
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    groups = param_groups(model.named_parameters(), "muon", 0.1)
    where = {n: g for g in groups for n in g["names"]}
    muon = {n for n, g in where.items() if g["use_muon"]}
    assert "model.layers.1.self_attn.q_proj.weight" in muon
    assert "model.layers.1.block_sparse_moe.gate.weight" in muon
    assert "model.layers.1.block_sparse_moe.experts.w13_weight" in muon
    assert where["model.layers.1.block_sparse_moe.experts.w13_weight"]["split"] == 2
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.A_log",
                 "model.layers.0.self_attn.dt_bias", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_conv1d.weight", "model.norm.weight"):
        assert name in where and not where[name]["use_muon"], name
    for name in ("model.layers.0.self_attn.A_log", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_conv1d.weight"):
        assert where[name]["weight_decay"] == 0.0, name
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.kv_b_proj.weight"):
        assert where[name]["weight_decay"] == 0.1, name
    # the router's correction bias is no trainable parameter: in no group
    assert not any("e_score_correction_bias" in n for n in where)
    assert all(not g["use_muon"] for g in param_groups(model.named_parameters(), "adamw", 0.1))


def test_build_optimizer_kinds():
    model = torch.nn.Linear(4, 4)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.1), torch.optim.AdamW)


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "constant"])
def test_schedules(schedule):
    f = [lr_factor(s, 100, 10, schedule, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up to the peak
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:10]))
    if schedule == "constant":
        assert all(x == 1.0 for x in f[10:])
    else:
        assert f[-1] == pytest.approx(0.1)  # ends at min-lr
        assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # never rises after warm-up
    if schedule == "wsd":
        assert all(x == 1.0 for x in f[10:80]) and f[81] < 1.0
