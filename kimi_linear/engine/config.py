"""EngineConfig: the engine's knobs (vLLM names), validated once, plus the checkpoint's generation config.

`EngineConfig` holds what the user asked for; `resolve()` fills the values that depend on the
checkpoint and the machine (device, dtype, max_model_len) and returns a new frozen config. Every
invalid value raises `ConfigError` naming the field, never a bare assert.

Knobs meant for tests and benchmarks: `block_size` (tokens per MLA cache block),
`num_gpu_blocks_override` / `num_state_slots_override` (skip memory sizing), and
`max_cuda_graph_batch_size` (largest captured decode batch; default max_num_seqs).
`structured_outputs_any_whitespace` (default False): JSON constrained output allows free whitespace
between tokens; off, JSON comes in one line with ", " / ": " separators, a guard against models that
loop on whitespace (vLLM's `disable_any_whitespace`, inverted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.errors import ConfigError

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint folder (config.json [+ safetensors] [+ tokenizer])
    device: str | None = None  # None = "cuda" when available, else "cpu"
    dtype: Any = None  # None / "auto" = the checkpoint's dtype; a name or a torch.dtype
    max_model_len: int | None = None  # None = the config's model_max_length (capped by cache size)
    max_num_seqs: int = 256  # running requests at once (= KDA state slots wanted)
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    gpu_memory_utilization: float = 0.9  # fraction of the GPU this engine may use
    enforce_eager: bool = False  # True = no CUDA graphs
    seed: int = 0  # global RNG seed (requests without their own seed)
    load_format: str = "auto"  # "auto" = read the weights, "dummy" = random weights from config.json
    tokenizer: str | None = None  # tokenizer folder (default: the model folder)
    block_size: int = 64  # tokens per MLA latent-cache block
    num_gpu_blocks_override: int | None = None  # fixed number of MLA blocks (skips sizing)
    num_state_slots_override: int | None = None  # fixed number of KDA state slots (skips sizing)
    max_cuda_graph_batch_size: int | None = None  # largest captured decode batch (default max_num_seqs)
    cuda_graph_reserve_bytes: int = 512 * 1024 ** 2  # kept free on CUDA for the graphs' private pool
    structured_outputs_any_whitespace: bool = False  # JSON grammars allow free whitespace between tokens

    def __post_init__(self):
        def pos_int(name: str, optional: bool = False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")

        if not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError("model", f"must be a checkpoint folder path, got {self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        if not os.path.isdir(self.model):
            raise ConfigError("model", f"{self.model} is not a folder")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            pos_int(name)
        for name in ("max_model_len", "num_gpu_blocks_override", "num_state_slots_override",
                     "max_cuda_graph_batch_size"):
            pos_int(name, optional=True)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < u <= 1.0:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {u!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError("load_format", f"must be 'auto' or 'dummy', got {self.load_format!r}")
        if not isinstance(self.structured_outputs_any_whitespace, bool):
            raise ConfigError("structured_outputs_any_whitespace",
                              f"must be true or false, got {self.structured_outputs_any_whitespace!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        if self.dtype is not None and self.dtype != "auto":
            parse_dtype(self.dtype, "dtype")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError("device", f"not a device: {self.device!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("device", "CUDA was requested but torch sees no CUDA device")
            if dev.type not in ("cuda", "cpu"):
                raise ConfigError("device", f"only 'cuda' and 'cpu' are supported, got {self.device!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, model_config: ModelConfig) -> torch.dtype:
        if self.dtype is None or self.dtype == "auto":
            return model_config.torch_dtype
        return parse_dtype(self.dtype, "dtype")

    @property
    def use_cuda_graphs(self) -> bool:
        return self.torch_device.type == "cuda" and not self.enforce_eager

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def resolve_max_model_len(self, model_config: ModelConfig) -> int:
        """The user's max_model_len, or the config's model_max_length. The model has no positional
        embeddings, so a longer max_model_len than the config's is allowed with a warning."""
        if self.max_model_len is None:
            return model_config.max_position
        if self.max_model_len > model_config.max_position:
            logger.warning("max_model_len %d exceeds the config's model_max_length %d (allowed: NoPE model)",
                           self.max_model_len, model_config.max_position)
        return self.max_model_len

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Build from keyword arguments, naming any unknown one in a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in kwargs:
            if k not in names:
                raise ConfigError(k, f"unknown engine option; known: {', '.join(sorted(names - {'model'}))}")
        return cls(model=model, **kwargs)


def read_generation_config(path: str) -> dict:
    """`generation_config.json` of the folder as a dict ({} when absent). Raises ConfigError when invalid."""
    file = os.path.join(path, GENERATION_CONFIG)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(GENERATION_CONFIG, f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(GENERATION_CONFIG, f"{file} must hold a JSON object")
    return data


def eos_token_ids(model_config: ModelConfig, generation_config: dict) -> frozenset[int]:
    """The union of config.json's eos ids and generation_config.json's `eos_token_id` (int or list)."""
    ids = set(model_config.eos_token_ids)
    g = generation_config.get("eos_token_id")
    if isinstance(g, int) and not isinstance(g, bool):
        ids.add(g)
    elif isinstance(g, list):
        for e in g:
            if not isinstance(e, int) or isinstance(e, bool):
                raise ConfigError(f"{GENERATION_CONFIG}.eos_token_id", f"must hold integers, got {g!r}")
            ids.add(e)
    elif g is not None:
        raise ConfigError(f"{GENERATION_CONFIG}.eos_token_id", f"must be an integer or a list, got {g!r}")
    return frozenset(ids)


def default_sampling_kwargs(generation_config: dict) -> dict:
    """SamplingParams defaults taken from generation_config.json (vLLM's `--generation-config auto`)."""
    out = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                     ("repetition_penalty", "repetition_penalty"), ("min_p", "min_p"),
                     ("max_new_tokens", "max_tokens")):
        if generation_config.get(src) is not None:
            out[dst] = generation_config[src]
    return out
