"""The synthetic tasks' models: 2 decoder layers of one token mixer each, 2 heads of dim 128 (the report's setup).

`mixer` picks the token mixer of both layers: "kda" (channel-wise forget gate), "gdn" (KDA with one gate value
per head: `linear_attn_config.gdn_layers`) or "mla" (full attention, NoPE as in Kimi Linear). The FFN is a
dense SwiGLU; everything else is the Kimi Linear model as it ships (`models.KimiLinearForCausalLM`), so the
comparison is between the mixers alone. `model_config` is an official-format config dict.

Weights: `models/init.py`'s init is made for kernel tests (unit-size activations, lm_head gain 3: peaked
logits), which starts training at a loss far above uniform (10.9 vs ln 1024 = 6.9 on MQAR). `build_model`
keeps its gate, conv and norm parameters and redraws every weight matrix GPT-2 / Zoology style: N(0, 0.02),
the residual outputs (o_proj, down_proj) N(0, 0.02 / sqrt(2 * layers)), so the logits start near uniform.
"""

from __future__ import annotations

import math

import torch

MIXERS = ("kda", "gdn", "mla")


def model_config(mixer: str, vocab_size: int, hidden_size: int = 256, num_heads: int = 2, head_dim: int = 128,
                 num_layers: int = 2) -> dict:
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; choose from {', '.join(MIXERS)}")
    from kimi_linear.tools.presets import preset_config

    d = preset_config("tiny")
    layers = list(range(1, num_layers + 1))
    lac = {"kda_layers": [] if mixer == "mla" else layers, "full_attn_layers": layers if mixer == "mla" else [],
           "num_heads": num_heads, "head_dim": head_dim, "short_conv_kernel_size": 4}
    if mixer == "gdn":
        lac["gdn_layers"] = layers
    d.update(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
             num_attention_heads=num_heads, num_key_value_heads=num_heads, head_dim=hidden_size // num_heads,
             intermediate_size=4 * hidden_size, kv_lora_rank=head_dim, qk_nope_head_dim=head_dim,
             qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim, num_experts=0, first_k_dense_replace=num_layers,
             bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype="float32", linear_attn_config=lac,
             model_max_length=1 << 20)
    for key in ("num_experts_per_token", "num_shared_experts", "moe_intermediate_size"):
        d.pop(key, None)
    return d


def build_model(mixer: str, vocab_size: int, device: torch.device, seed: int = 0, **shape):
    """The fp32 model (master weights) in training mode, weights from `seed`."""
    from kimi_linear.config import ModelConfig
    from kimi_linear.models import KimiLinearForCausalLM
    from kimi_linear.models.init import init_weights

    config = ModelConfig.from_dict(model_config(mixer, vocab_size, **shape))
    model = KimiLinearForCausalLM.from_config(config, device=device, dtype=torch.float32)
    init_weights(model, seed=seed)
    small_init(model, seed=seed)
    return model.train()


INIT_STD = 0.02
RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight")


@torch.no_grad()
def small_init(model, seed: int = 0) -> None:
    """Redraw every weight matrix N(0, INIT_STD) (residual outputs / sqrt(2 * layers)) from `seed`; leave the
    vectors, gates (A_log, dt_bias) and short-conv filters as they are."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    residual = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("conv1d.weight"):
            continue
        std = INIT_STD * (residual if name.endswith(RESIDUAL_OUT) else 1.0)
        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * std)
