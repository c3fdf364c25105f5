"""Write an FP8 checkpoint from a bf16 one (`kimi-linear quantize IN OUT --format ...`), tensor by tensor.

Formats (what `loader/quant.py` loads back):
- "compressed-tensors": FP8 "float-quantized", `weight` float8_e4m3fn + `weight_scale` fp32 [N, 1] per output
  channel (or [1] per tensor with strategy="tensor"), dynamic per-token activations; config.json gains the
  compressed-tensors `quantization_config` (config_groups / targets ["Linear"] / ignore).
- "block": DeepSeek-V3 / Kimi K2 block-wise, `weight` float8_e4m3fn + `weight_scale_inv` fp32
  [ceil(N / B), ceil(K / B)], `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [B, B]}`.
Quantized: every linear weight of the decoder layers (attention projections, kv_b_proj included, the dense
and shared MLPs, the routed experts); left as they are: embeddings, lm_head, routers, norms, conv weights,
A_log, dt_bias (the `ignore` list says so). The input is read one tensor at a time and the output written
in shards of at most `max_shard_bytes`, so any size converts in bounded memory; the other files of the
folder (tokenizer, generation config, chat template) are copied.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.errors import ConfigError
from kimi_linear.loader.safetensors import INDEX_NAME, _safe_open, checkpoint_shards, name_shards
from kimi_linear.ops.quant import quantize_fp8

FORMATS = ("compressed-tensors", "block")
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp|block_sparse_moe\.(shared_experts|experts\.\d+))\."
                       r"(\w*proj\w*|w[123])\.weight$")
CT_IGNORE = ["lm_head", "re:.*block_sparse_moe\\.gate$"]


def quantization_config(fmt: str, block_size: int, strategy: str) -> dict:
    if fmt == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block_size, block_size]}
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "observer": "minmax"}
    acts = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
            "observer": None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}},
            "ignore": CT_IGNORE, "kv_cache_scheme": None}


def quantize_tensor(t: torch.Tensor, fmt: str, block_size: int, strategy: str) -> dict[str, torch.Tensor]:
    """{"": fp8 weight, suffix: fp32 scale} for one [N, K] weight."""
    if fmt == "block":
        q, s = quantize_fp8(t, (block_size, block_size))
        return {"": q, "_scale_inv": s}
    if strategy == "tensor":
        s = (t.float().abs().amax() / 448.0).clamp_min(1e-12).reshape(1)
        return {"": (t.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), "_scale": s}
    q, s = quantize_fp8(t, None)
    return {"": q, "_scale": s}


def quantize_checkpoint(src: str, dst: str, fmt: str = "compressed-tensors", block_size: int = 128,
                        strategy: str = "channel", max_shard_bytes: int = 2 * 1024 ** 3) -> int:
    """Convert the bf16 checkpoint folder `src` into an FP8 one at `dst`. Returns the tensors quantized."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ConfigError("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if strategy not in ("channel", "tensor") or (fmt == "block" and strategy != "channel"):
        raise ConfigError("strategy", f"must be 'channel' or 'tensor' (compressed-tensors only), got {strategy!r}")
    if block_size < 16 or block_size % 16:
        raise ConfigError("block_size", f"must be a positive multiple of 16, got {block_size}")
    config = ModelConfig.from_pretrained(src)
    if "quantization_config" in config.raw:
        raise ConfigError("quantization_config", f"{src} is already quantized")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConfigError("out_dir", "the output folder must differ from the input folder")
    os.makedirs(dst, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size = total = n_quantized = 0
    written: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        tmp = f"model-part-{len(written) + 1:05d}.safetensors"
        save_file(shard, os.path.join(dst, tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, size = {}, 0

    for name_list_file, names in checkpoint_shards(src).items():
        with _safe_open(os.path.join(src, name_list_file)) as f:
            for name in names:
                t = f.get_tensor(name)
                outs = {name: t}
                if QUANTIZED.match(name) and t.dim() == 2:
                    outs = {name + sfx: v for sfx, v in quantize_tensor(t, fmt, block_size, strategy).items()}
                    n_quantized += 1
                for k, v in outs.items():
                    nbytes = v.numel() * v.element_size()
                    if size and size + nbytes > max_shard_bytes:
                        flush()
                    shard[k] = v.contiguous()
                    size += nbytes
                    total += nbytes
    if shard:
        flush()
    name_shards(dst, written, total)
    raw = dict(config.raw)
    raw["quantization_config"] = quantization_config(fmt, block_size, strategy)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as fo:
        json.dump(raw, fo, indent=2)
    for entry in os.listdir(src):  # tokenizer, generation config, chat template, ...
        p = os.path.join(src, entry)
        if os.path.isfile(p) and not entry.endswith(".safetensors") and entry not in (INDEX_NAME, "config.json"):
            shutil.copy2(p, os.path.join(dst, entry))
    return n_quantized
