"""Export a trained model as a Hugging Face checkpoint folder that serve, LLM(...) and transformers load.

The folder gets
- config.json: the source config (--model's config.json, or the preset's dict) with `dtype` set to the
  export dtype;
- model-0000i-of-0000n.safetensors + model.safetensors.index.json: official tensor names through
  `model.checkpoint_layout()` (experts unstacked), in the export dtype (A_log / dt_bias fp32), written by
  `loader.safetensors.save_checkpoint`;
- the tokenizer files and chat template of the tokenizer folder (and any remote-code .py files of the
  source checkpoint, so its auto_map keeps working);
- generation_config.json: the source's, or one derived from the config (`tools.create.generation_config`).

Under FSDP2 every rank takes part in gathering the full state dict (CPU, rank 0 only); rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.loader.safetensors import save_checkpoint

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.json", "special_tokens_map.json")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def full_state_dict(model: torch.nn.Module, distributed: bool) -> dict[str, torch.Tensor] | None:
    """Parameter name -> full CPU tensor (None on ranks other than 0 when distributed)."""
    if not distributed:
        return None  # save_checkpoint reads the parameters themselves
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def export_hf(model: torch.nn.Module, out_dir: str, config_dict: dict, dtype: torch.dtype, tokenizer_dir: str | None,
              source_dir: str | None = None, distributed: bool = False, is_main: bool = True) -> None:
    """Write the HF folder `out_dir` (every rank calls this under FSDP2; rank 0 writes)."""
    full = full_state_dict(model, distributed)
    if not is_main:
        return
    os.makedirs(out_dir, exist_ok=True)
    materialize = None if full is None else (lambda name, p: full[name])
    save_checkpoint(model, out_dir, dtype=dtype, progress=False, materialize=materialize)
    cfg = dict(config_dict)
    cfg["dtype"] = DTYPE_NAMES[dtype]
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    copy_side_files(out_dir, tokenizer_dir, source_dir, ModelConfig.from_dict(cfg))


def copy_side_files(out_dir: str, tokenizer_dir: str | None, source_dir: str | None, config: ModelConfig) -> None:
    """Tokenizer files, chat template, remote code and generation_config.json next to the weights."""
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    if source_dir is not None:
        for name in os.listdir(source_dir):
            if name.endswith(".py"):
                shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
    gen_src = os.path.join(source_dir, "generation_config.json") if source_dir else None
    if gen_src is not None and os.path.isfile(gen_src):
        shutil.copyfile(gen_src, os.path.join(out_dir, "generation_config.json"))
    else:
        from kimi_linear.tools.create import generation_config

        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config(config), f, indent=2)
