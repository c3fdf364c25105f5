"""What a run trains on and with: the tokenizer folder, the documents, and the fp32 model.

- Tokenizer: --tokenizer, else --model's folder; for --preset one is built (tools/tokenizer.py, the same
  files `kimi-linear init` writes) into OUT/tokenizer by rank 0, for vocabularies of at most 4352 ids (MAX_BUILT_VOCAB).
- Model: --model loads the checkpoint in fp32 (master weights); --preset builds the preset's config with
  random well-scaled weights from --seed (`models.init.init_weights`). Either way `config_dict` is the
  official-format config.json dict that the export writes back.
"""

from __future__ import annotations

import json
import os

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.errors import TrainConfigError
from kimi_linear.train.args import TrainConfig
from kimi_linear.train.distributed import DistInfo, barrier



def source_config_dict(cfg: TrainConfig) -> dict:
    """The official-format config dict of --model (its config.json) or --preset."""
    if cfg.model is not None:
        with open(os.path.join(cfg.model, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    from kimi_linear.tools.presets import preset_config

    return preset_config(cfg.preset)


def tokenizer_dir(cfg: TrainConfig, config: ModelConfig, config_dict: dict, info: DistInfo) -> str:
    """The folder whose tokenizer files the run uses (built for --preset when needed)."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.model is not None:
        return cfg.model
    from kimi_linear.tools.tokenizer import MAX_BUILT_VOCAB

    if config.vocab_size > MAX_BUILT_VOCAB:
        raise TrainConfigError("--tokenizer", f"--preset {cfg.preset} has a {config.vocab_size}-token vocabulary; "
                                              f"no tokenizer is built for more than {MAX_BUILT_VOCAB}: give --tokenizer DIR")
    path = os.path.join(cfg.out, "tokenizer")
    if info.is_main and not os.path.isfile(os.path.join(path, "tiktoken.model")):
        from kimi_linear.tools.tokenizer import write_tokenizer

        write_tokenizer(path, config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id,
                        config_dict.get("model_max_length"))
    barrier()
    return path


def load_tokenizer_from(path: str):
    from kimi_linear.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None:
        raise TrainConfigError("--tokenizer" if path else "--model", f"{path} has no tokenizer (tiktoken.model)")
    return tok


def build_model(cfg: TrainConfig, config: ModelConfig, device: torch.device):
    """The model in fp32 on `device`, in training mode."""
    from kimi_linear.models import KimiLinearForCausalLM

    if cfg.model is not None:
        model = KimiLinearForCausalLM.from_pretrained(cfg.model, device=device, dtype=torch.float32, progress=False,
                                                      config=config)
    else:
        from kimi_linear.models.init import init_weights

        model = KimiLinearForCausalLM.from_config(config, device=device, dtype=torch.float32)
        init_weights(model, seed=cfg.seed)
    return model.train()
