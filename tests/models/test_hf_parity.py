"""Our model loads checkpoints written by transformers==5.23.0 unchanged and matches its fp32 logits.

The oracle is transformers' native KimiLinearForCausalLM, an independent implementation. Each
config is built on the fly; A_log, dt_bias, the router correction bias and every norm weight are
re-randomised before saving, since transformers initialises them to constants that hide bugs.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

transformers = pytest.importorskip("transformers")

from kimi_linear import KimiLinearForCausalLM  # noqa: E402

CONFIGS = {
    # two groups with topk_group 1, dense first layer, v_head_dim != qk_nope_head_dim
    "A": dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=24, num_local_experts=8, num_experts_per_tok=2, n_group=2,
              topk_group=1, first_k_dense_replace=1,
              linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2,
                                  "head_dim": 32, "short_conv_kernel_size": 4}),
    # MLA first and last, two dense layers, 4 groups keep 2, 2 shared experts, no renormalisation
    "B": dict(vocab_size=256, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=5,
              num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=48, qk_rope_head_dim=16,
              qk_nope_head_dim=32, v_head_dim=16, num_local_experts=16, num_experts_per_tok=4, n_group=4,
              topk_group=2, first_k_dense_replace=2, n_shared_experts=2, norm_topk_prob=False,
              routed_scaling_factor=1.5,
              linear_attn_config={"kda_layers": [2, 3, 4], "full_attn_layers": [1, 5], "num_heads": 4,
                                  "head_dim": 16, "short_conv_kernel_size": 3}),
    # every layer MoE, top-1 routing, a single MLA head, wide KDA heads
    "C": dict(vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=1, num_key_value_heads=1, kv_lora_rank=16, qk_rope_head_dim=16,
              qk_nope_head_dim=16, v_head_dim=16, num_local_experts=4, num_experts_per_tok=1, n_group=1,
              topk_group=1, first_k_dense_replace=0,
              linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2], "num_heads": 1,
                                  "head_dim": 64, "short_conv_kernel_size": 4}),
}


def write_hf_checkpoint(path, overrides: dict, seed: int = 0):
    from transformers import KimiLinearConfig
    from transformers import KimiLinearForCausalLM as HF

    torch.manual_seed(seed)
    cfg = KimiLinearConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    model = HF(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):
                dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(0.1)).exp()
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif p.dim() >= 2 and "embed" not in name:
                # hotter than the HF default (std 0.02) so that every layer matters in the logits
                p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf = write_hf_checkpoint(path, CONFIGS[request.param], seed=ord(request.param))
    ours = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    return request.param, hf, ours


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_logits_match_transformers(pair, T):
    name, hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    e = rel_err(ref, got)
    assert e < 1e-4, f"config {name}, T={T}: relative logits error {e:.2e}"
    # the logits are far from uniform: a model that ignored a layer would not pass by luck
    assert ref.float().softmax(-1).amax(-1).mean() > 2.0 / ours.config.vocab_size


def test_layer_kinds_follow_one_based_lists(pair):
    name, hf, ours = pair
    hf_kinds = ["kda" if t == "linear_attention" else "mla" for t in hf.config.layer_types]
    assert list(ours.config.layer_types) == hf_kinds
    hf_mlp = ["moe" if t == "sparse" else "dense" for t in hf.config.mlp_layer_types]
    assert list(ours.config.mlp_types) == hf_mlp
