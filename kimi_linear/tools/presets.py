"""Named model shapes for `kimi-linear init` and benchmarks, as official-format config dicts.

- `48b-a3b`: Kimi-Linear-48B-A3B exactly (spec section 1).
- `48b-a3b-e64`: the same with 64 routed experts: identical bytes per decoded token, ~28 GB of weights.
- `small`: ~190M parameters, the real head sizes (KDA 128, MLA 128 + 64 / 512 latent), 12 layers.
- `tiny`: ~1M parameters, 4 layers (3 KDA + 1 MLA, first layer dense, 16 experts), for tests.
- `demo`: ~12M parameters, 6 layers (4 KDA + 2 MLA, first layer dense, 8 experts of width 192, top-2 + 1
  shared), a 4352-token vocabulary (4096 BPE ranks + 256 specials): the shipped demo model's shape
  (`tools/demo_model.py`, trained on the King James Bible with its own tokenizer).
"""

from __future__ import annotations

import copy

from kimi_linear.errors import ConfigError

_REAL = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "model_type": "kimi_linear",
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 72,
    "intermediate_size": 9216,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "model_max_length": 1048576,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "dtype": "bfloat16",
    "initializer_range": 0.02,
    "use_cache": True,
    "linear_attn_config": {
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
    },
}


def _hybrid_lists(num_layers: int) -> dict:
    """3 KDA : 1 MLA, with an MLA layer last (as the real model does)."""
    full = [i for i in range(4, num_layers + 1, 4)]
    if num_layers not in full:
        full.append(num_layers)
    return {"kda_layers": [i for i in range(1, num_layers + 1) if i not in full], "full_attn_layers": full}


def _derived(drop_auto_map: bool = True, **fields) -> dict:
    """A copy of the real config with `fields` replaced (the small shapes drop the remote-code auto_map)."""
    d = copy.deepcopy(_REAL)
    if drop_auto_map:
        d.pop("auto_map")
    d.update(fields)
    return d


# Real head sizes scaled down; ids of the built tokenizer's [BOS], <|im_end|>, [PAD] (base vocabulary + 0, 2, 255).
_TINY = dict(
    vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    head_dim=16, intermediate_size=192, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, num_experts=16, num_experts_per_token=4, num_shared_experts=1, moe_intermediate_size=64,
    model_max_length=65536, bos_token_id=768, eos_token_id=770, pad_token_id=1023,
    linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 32,
                        "short_conv_kernel_size": 4},
)
_SMALL = dict(
    vocab_size=4352, hidden_size=768, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
    head_dim=96, intermediate_size=2048, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, num_experts=16, num_experts_per_token=4, num_shared_experts=1, moe_intermediate_size=224,
    model_max_length=1048576, bos_token_id=4096, eos_token_id=4098, pad_token_id=4351,
    linear_attn_config={**_hybrid_lists(12), "num_heads": 6, "head_dim": 128, "short_conv_kernel_size": 4},
)

# Special ids of a 4096-rank tokenizer (base + 0, 2, 255); bf16 weights are ~24 MB.
_DEMO = dict(
    vocab_size=4352, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
    head_dim=64, intermediate_size=1024, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, num_experts=8, num_experts_per_token=2, num_shared_experts=1, moe_intermediate_size=192,
    model_max_length=8192, bos_token_id=4096, eos_token_id=4098, pad_token_id=4351,
    linear_attn_config={**_hybrid_lists(6), "num_heads": 4, "head_dim": 64, "short_conv_kernel_size": 4},
)


PRESETS = {
    "tiny": lambda: _derived(**copy.deepcopy(_TINY)),
    "small": lambda: _derived(**copy.deepcopy(_SMALL)),
    "demo": lambda: _derived(**copy.deepcopy(_DEMO)),
    "48b-a3b": lambda: _derived(drop_auto_map=False),
    "48b-a3b-e64": lambda: _derived(drop_auto_map=False, num_experts=64),
}
LARGE_PRESETS = {"48b-a3b", "48b-a3b-e64"}


def preset_config(name: str) -> dict:
    """The official-format config.json dict of preset `name`."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
