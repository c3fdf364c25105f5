"""Per-layer token mixers: "kda" (channel-wise forget gate), "gdn" (one forget-gate value per head) and
"mla" (full attention), chosen by `linear_attn_config.gdn_layers` (1-based, a subset of kda_layers).

- The config key: parsed, validated with errors naming it, written back only when used (a config without
  it round-trips to the official layout), parameter count and checkpoint shapes.
- A GDN layer is a KDA layer whose per-channel gate is constant within each head: the same output as KDA
  with f_b_proj's rows and dt_bias repeated over the K channels of each head.
- A GDN model: a packed row equals its documents alone (logits and gradients); its checkpoint is written
  and loaded by us, and transformers refuses it on the two changed shapes instead of misreading it; the
  kernel path (prefill then decode, Triton interpreter) equals the naive path.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear import KimiLinearForCausalLM, SequenceCache
from kimi_linear.config import ModelConfig
from kimi_linear.errors import ConfigError
from kimi_linear.layers.kda import GatedDeltaNet, KimiDeltaAttention
from kimi_linear.models import ForwardContext
from kimi_linear.tools.create import create_checkpoint
from kimi_linear.tools.presets import preset_config


def gdn_dict(gdn=(2,)) -> dict:
    d = preset_config("tiny")  # layers 1-3 linear, 4 full attention (1-based)
    d["linear_attn_config"]["gdn_layers"] = list(gdn)
    return d


def test_config_key():
    cfg = ModelConfig.from_dict(gdn_dict((2, 3)))
    assert cfg.layer_types == ("kda", "gdn", "gdn", "mla")
    assert cfg.kda_layers == [0] and cfg.gdn_layers == [1, 2] and cfg.linear_layers == [0, 1, 2]
    lac = cfg.to_hf_dict()["linear_attn_config"]
    assert lac["kda_layers"] == [1, 2, 3] and lac["full_attn_layers"] == [4] and lac["gdn_layers"] == [2, 3]
    assert ModelConfig.from_dict(cfg.to_hf_dict()).layer_types == cfg.layer_types
    plain = ModelConfig.from_dict(preset_config("tiny"))
    assert "gdn_layers" not in plain.to_hf_dict()["linear_attn_config"]
    assert ModelConfig.from_dict(gdn_dict(())).layer_types == plain.layer_types
    model = KimiLinearForCausalLM.from_config(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, GatedDeltaNet)
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    assert attn.f_b_proj.weight.shape == (H, K) and attn.dt_bias.shape == (H,)
    assert type(model.model.layers[0].self_attn) is KimiDeltaAttention
    specs = KimiLinearForCausalLM.cache_specs(cfg, torch.bfloat16)
    assert specs[1] == specs[0]  # a GDN layer keeps exactly KDA's state slot


@pytest.mark.parametrize("gdn, message", [
    ((4,), "not a linear-attention layer"), ((0,), "out of range"), ((5,), "out of range"),
    ((2, 2), "twice"), ("2", "list of 1-based"),
])
def test_config_key_errors(gdn, message):
    d = gdn_dict(())
    d["linear_attn_config"]["gdn_layers"] = gdn if isinstance(gdn, str) else list(gdn)
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_dict(d)
    assert e.value.key == "linear_attn_config.gdn_layers"


def test_gdn_equals_kda_with_a_per_head_gate():
    cfg = ModelConfig.from_dict(gdn_dict())
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    gdn, kda = GatedDeltaNet(cfg, 1), KimiDeltaAttention(cfg, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gdn.parameters():
            p.normal_(0, 0.3)
        for name, p in kda.named_parameters():
            src = dict(gdn.named_parameters())[name]
            p.copy_(src.repeat_interleave(K, 0) if name in ("f_b_proj.weight", "dt_bias") else src)
    x = torch.randn(11, cfg.hidden_size)
    ctx = ForwardContext.for_prefill([4, 7], "cpu")
    assert_close("GDN vs KDA with repeated gate rows", kda(x, ctx), gdn(x, ctx), 1e-5)


@pytest.fixture(scope="module")
def gdn_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gdn")
    create_checkpoint(path, gdn_dict(), seed=1, tokenizer=False, progress=False)
    return path


def test_gdn_model_packed_row_equals_documents_alone(gdn_checkpoint):
    model = KimiLinearForCausalLM.from_pretrained(gdn_checkpoint, dtype=torch.float32, progress=False).train()
    lengths = [9, 1, 20]
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)))
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32)
    labels = torch.randint(0, model.config.vocab_size, (1, 30))
    out = model(ids, cu_seqlens=cu, labels=labels)
    out.loss_sum.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        with torch.no_grad():
            assert_close(f"logits {a}:{b}", model(ids[:, a:b]), logits[:, a:b], 1e-5)
        model(ids[:, a:b], labels=labels[:, a:b]).loss_sum.backward()
    gdn = model.model.layers[1].self_attn
    assert gdn.f_b_proj.weight.grad.abs().sum() > 0 and gdn.dt_bias.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        if n in packed:
            assert_close(f"grad {n}", p.grad, packed[n], 1e-5)


def test_transformers_refuses_a_gdn_checkpoint(gdn_checkpoint):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.KimiLinearForCausalLM.from_pretrained(gdn_checkpoint)


@torch.no_grad()
def test_gdn_kernel_path_matches_naive(gdn_checkpoint, monkeypatch):
    model = KimiLinearForCausalLM.from_pretrained(gdn_checkpoint, dtype=torch.float32, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))

    def run():
        cache = SequenceCache(model.config, 1, block_size=4, initial_blocks=4)
        outs = [model(ids[:, :3], cache)] + [model(ids[:, t:t + 1], cache) for t in range(3, 5)]
        return torch.cat(outs, 1)

    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    ref = run()
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    assert_close("GDN model: kernel path vs naive", ref, run(), 1e-4)
