"""Random, well-scaled weights for a KimiLinearForCausalLM (the `init` presets and load_format="dummy").

Scaled so that activations keep unit size through every layer and the model behaves like a trained
one in the ways kernels and tests care about: linear weights N(0, 1/fan_in) with residual outputs
shrunk by 1/sqrt(2 * layers), norm weights around 1, realistic KDA gates (A_log = log U(1, 16),
dt_bias = softplus^-1 of dt ~ logU(1e-3, 1e-1)), a non-zero router correction bias, and peaked logits
(lm_head gain 3) since near-uniform logits hide bugs.

`init_tensor` draws one parameter at a time from a generator, in parameter order, so the same seed
gives the same weights whether they fill a model in place (`init_weights`) or stream into checkpoint
shards without ever building the model (`kimi-linear init` of the large presets).
"""

from __future__ import annotations

import math

import torch


def init_tensor(name: str, shape: tuple[int, ...], config, gen: torch.Generator) -> torch.Tensor | None:
    """A fresh fp32 value for parameter `name`, on the generator's device (None: leave as is)."""
    device = gen.device
    residual_scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) * (hi - lo) + lo

    fan_in = shape[-1]
    if name == "model.embed_tokens.weight":
        return normal(1.0)
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else normal(3.0 / math.sqrt(fan_in))
    if name.endswith(("layernorm.weight", "norm.weight")):
        return uniform(0.8, 1.2)
    if name.endswith(".A_log"):
        return uniform(1.0, 16.0).log()
    if name.endswith(".dt_bias"):
        dt = torch.exp(uniform(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith("e_score_correction_bias"):
        return normal(0.1)
    if name.endswith("conv1d.weight"):
        return normal(0.5)
    if name.endswith(("experts.w2_weight", "o_proj.weight", "down_proj.weight")):
        return normal(residual_scale / math.sqrt(fan_in))
    if name.endswith("self_attn.q_proj.weight") and config.layer_types[int(name.split(".")[2])] == "mla":
        # hotter MLA queries, so that attention is far from uniform
        return normal(2.0 / math.sqrt(fan_in))
    if len(shape) >= 2:
        return normal(1.0 / math.sqrt(fan_in))
    raise ValueError(f"init_tensor: no rule for parameter {name}")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@torch.no_grad()
def init_weights(model, seed: int = 0) -> None:
    """Fill every parameter of `model` in place (on its device).

    FP8 weights (`layers/linear.py`, FP8 expert stacks) get the value the bf16 model would get from the same
    seed (the draws run in the same order: scales are skipped), quantized with their scale's layout, one
    expert at a time for the stacks (a bounded fp32 transient)."""
    from kimi_linear.layers.linear import fp8_scale_of
    from kimi_linear.ops.quant import FP8, quantize_fp8

    device = next(model.parameters()).device
    gen = make_generator(seed, device)
    for name, p in model.named_parameters():
        if name.endswith(("_scale", "_scale_inv")):
            continue  # filled with its FP8 weight
        value = init_tensor(name, tuple(p.shape), model.config, gen)
        if value is None:
            continue
        if p.dtype != FP8:
            p.copy_(value)
            continue
        scale, block = fp8_scale_of(p)
        if p.dim() == 3:
            for e in range(p.shape[0]):
                q, s = quantize_fp8(value[e], block)
                p[e].copy_(q)
                scale[e].copy_(s)
        else:
            q, s = quantize_fp8(value, block)
            p.copy_(q)
            scale.copy_(s)
        del value
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 transients must not count as the engine's memory when it sizes the cache
