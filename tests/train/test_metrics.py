"""The FLOP count of kimi_linear/train/metrics.py: one owner (`forward_flops_parts`) for the training count and
the prefill benchmark; the training count keeps its earlier values."""

from __future__ import annotations

import pytest

from kimi_linear.config import ModelConfig
from kimi_linear.tools.presets import preset_config
from kimi_linear.train.metrics import active_matmul_params, flops_per_token, forward_flops, forward_flops_parts


def earlier_flops_per_token(config, seq_len: int) -> float:
    """flops_per_token as written before forward_flops existed (3 x the per-token forward)."""
    fwd = 2 * active_matmul_params(config)
    for kind in config.layer_types:
        if kind == "mla":
            fwd += 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
        else:
            fwd += 6 * config.kda_num_heads * config.kda_head_dim ** 2 + 6 * config.kda_dim * config.conv_kernel_size
    return 3 * fwd


@pytest.mark.parametrize("preset", ["tiny", "48b-a3b"])
@pytest.mark.parametrize("seq_len", [32, 4096, 1000003])
def test_flops_per_token_unchanged(preset, seq_len):
    config = ModelConfig.from_dict(preset_config(preset))
    assert flops_per_token(config, seq_len) == pytest.approx(earlier_flops_per_token(config, seq_len), rel=1e-12)


def test_forward_flops_parts_48b():
    """48b-a3b: lm_head once for a prefill, MLA attention quadratic (7 layers x 32 heads x 320), KDA linear."""
    config = ModelConfig.from_dict(preset_config("48b-a3b"))
    N = 1 << 20
    lm_head = config.vocab_size * config.hidden_size
    p = forward_flops_parts(config, N, num_logit_tokens=1)
    assert p["matmul"] == pytest.approx(2 * (active_matmul_params(config) - lm_head) * N + 2 * lm_head)
    assert p["mla_attention"] == 7 * 32 * (192 + 128) * N * N
    assert p["kda"] == 20 * (6 * 32 * 128 * 128 + 6 * 32 * 128 * 4) * N
    assert p["total"] == p["matmul"] + p["mla_attention"] + p["kda"] == forward_flops(config, N, 1)
    assert 84e15 < p["total"] < 85e15  # the module docstring of benchmarks/prefill.py: 84.6 PFLOP at 1M
    full = forward_flops_parts(config, N)  # training: every token through lm_head
    assert full["matmul"] - p["matmul"] == pytest.approx(2 * lm_head * (N - 1))
