"""Create a complete Hugging Face-format checkpoint folder from a preset (what `kimi-linear init` does).

Writes config.json, generation_config.json, a Kimi-format tokenizer (tiktoken.model,
tokenizer_config.json, chat_template.jinja; built for vocabularies of at most 4352 ids (MAX_BUILT_VOCAB), i.e. the
`tiny`, `small` and `demo` presets) and, unless `weights=False`, random well-scaled weights as sharded
safetensors with model.safetensors.index.json in the official tensor names and dtypes (by default
for every preset but the 48b ones, which the engine can fill on the device with load_format="dummy").
Weights are generated tensor by tensor on a meta-device model and streamed into shards, so even the
48B preset never needs its weights in memory at once.
"""

from __future__ import annotations

import json
import os

import torch

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.loader.safetensors import save_checkpoint
from kimi_linear.models.init import init_tensor, make_generator
from kimi_linear.models.kimi_linear import FP32_PARAMS, KimiLinearForCausalLM
from kimi_linear.tools.presets import LARGE_PRESETS, preset_config
from kimi_linear.tools.tokenizer import MAX_BUILT_VOCAB, write_tokenizer



def generation_config(config: ModelConfig) -> dict:
    eos = list(config.eos_token_ids)
    # The Kimi tokenizer's [EOS] sits right before <|im_end|>; stop on both.
    if eos and (eos[0] - 1) not in eos and config.bos_token_id is not None and eos[0] - 2 == config.bos_token_id:
        eos.append(eos[0] - 1)
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else (eos or [None])[0],
            "pad_token_id": config.pad_token_id}


def default_weights(preset: str | dict) -> bool:
    """Whether `kimi-linear init` writes weights for `preset` by default (not for the 48b shapes)."""
    return not (isinstance(preset, str) and preset in LARGE_PRESETS)


def create_checkpoint(out_dir: str | os.PathLike, preset: str | dict = "tiny", seed: int = 0,
                      weights: bool | None = None, dtype: torch.dtype | str | None = None,
                      max_shard_bytes: int = 2 * 1024 ** 3, progress: bool = True,
                      tokenizer: bool | None = None) -> ModelConfig:
    """Write a checkpoint folder for `preset` (a preset name or an official-format config dict).

    `weights`: write random weights (default: unless `preset` names a 48b preset).
    `tokenizer`: write a built tokenizer (default: when the vocabulary has at most MAX_BUILT_VOCAB = 4352 ids)."""
    out_dir = os.fspath(out_dir)
    if weights is None:
        weights = default_weights(preset)
    cfg_dict = preset_config(preset) if isinstance(preset, str) else dict(preset)
    if dtype is not None:
        cfg_dict["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                             torch.float32: "float32"}[parse_dtype(dtype)]
    config = ModelConfig.from_dict(cfg_dict)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(config), f, indent=2)
    if tokenizer if tokenizer is not None else config.vocab_size <= MAX_BUILT_VOCAB:
        write_tokenizer(out_dir, config.vocab_size, config.bos_token_id, (list(config.eos_token_ids) or [None])[0],
                        config.pad_token_id, cfg_dict.get("model_max_length"))
    if weights:
        with torch.device("meta"):
            model = KimiLinearForCausalLM(config)
        gen = make_generator(seed, "cpu")

        def materialize(name: str, p: torch.Tensor) -> torch.Tensor:
            value = init_tensor(name, tuple(p.shape), config, gen)
            return value.to(torch.float32 if FP32_PARAMS.search(name) else config.torch_dtype)

        save_checkpoint(model, out_dir, max_shard_bytes=max_shard_bytes, dtype=config.torch_dtype,
                        progress=progress, materialize=materialize)
    return config
