"""KimiLinearForCausalLM: the decoder stack (spec section 2) and its two entry points.

- `model(input_ids [B, T], cache=None) -> logits [B, T, vocab]`: direct use, with an optional
  `SequenceCache` so that prefill, chunked prefill and token-by-token decode give the same logits.
- `model.forward_flat(input_ids [N], ctx) -> hidden [N, D]` and `model.compute_logits(hidden)`: the
  engine's interface, over a flat batch described by a ForwardContext.
- `cache_specs(config, dtype)`: what each layer keeps between passes (its mixer's `cache_spec`), from
  which the engine sizes memory; `model.make_cache(...)` allocates a ModelCache from them.

Parameter names equal the checkpoint's, except the routed experts, which are stacked per layer
(`experts.w13_weight`, `experts.w2_weight`); `checkpoint_layout()` gives the mapping both ways.
Projections that read the same input are stored as rows of one tensor (`tie_fused_weights`) so that
inference runs them as one GEMM; the decoder's residual adds are folded into the next norm's kernel.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.layers.fused import materialize, tie_all
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.layers.moe import MoE
from kimi_linear.layers.norm import Branch, RMSNorm
from kimi_linear.models.cache import ModelCache
from kimi_linear.models.context import ForwardContext

# Parameters that stay fp32 whatever the model dtype (spec section 3.2 / 8.13).
FP32_PARAMS = re.compile(r"(\.A_log|\.dt_bias|\.e_score_correction_bias)$")

# The token mixer of each `config.layer_types` kind; each declares its cache (`cache_spec`).
MIXERS = {"kda": KimiDeltaAttention, "mla": MultiHeadLatentAttention}


class KimiLinearDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_kda = config.layer_types[layer_idx] == "kda"
        self.is_moe = config.mlp_types[layer_idx] == "moe"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MIXERS[config.layer_types[layer_idx]](config, layer_idx)
        if self.is_moe:
            self.block_sparse_moe = MoE(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: Branch, ctx: ForwardContext, residual: torch.Tensor | None = None):
        """One pre-norm layer, the residual add deferred into the next norm (one kernel each, `RMSNorm.add`).

        x: the residual stream when `residual` is None (the first layer), else the previous layer's output
        branch (a tensor, or an MoE's unreduced `(y, weights)` pair) still to be added to `residual`.
        Returns (branch, residual): this layer's output stream is residual + branch."""
        h, residual = self.input_layernorm.add(x, residual)
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, ctx), residual)
        return (self.block_sparse_moe(h, reduce=False) if self.is_moe else self.mlp(h)), residual


class KimiLinearModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, ctx, residual)
        return self.norm.add(x, residual)[0]


class KimiLinearForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None) -> "KimiLinearForCausalLM":
        """Build with uninitialised storage on `device` in `dtype` (A_log, dt_bias and the router's
        correction bias stay fp32). Fill it with `load_weights` or `init_weights`."""
        device = torch.device(device or "cpu")
        dtype = parse_dtype(dtype, "dtype") if dtype is not None else config.torch_dtype
        with torch.device("meta"):
            model = cls(config)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if FP32_PARAMS.search(name) else dtype)
        materialize(model, device)  # to_empty, with each fused group allocated as one tensor
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.tie_fused_weights()  # no-op unless a group could not be placed as one tensor
        model.dtype = dtype
        return model.eval()

    def tie_fused_weights(self) -> int:
        """Store each group of projections that read the same input as consecutive rows of one tensor
        (`layers/fused.py`), so inference runs each group as one GEMM; names, shapes and memory unchanged.
        `from_config` allocates the groups tied; a forward without autograd re-ties a group whose storage
        was split since (e.g. by `model.to(...)`). Returns the number of groups tied now."""
        return tie_all(self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, load_format: str = "auto",
                        seed: int = 0, progress: bool = True, config: ModelConfig | None = None,
                        **config_overrides) -> "KimiLinearForCausalLM":
        """Load a Hugging Face checkpoint folder (config.json + safetensors) straight onto `device`.

        dtype: None/"auto" = the checkpoint's dtype. load_format: "auto" reads the weights, "dummy"
        fills random well-scaled weights from config.json alone (same shapes, for benchmarks).
        """
        from kimi_linear.loader.safetensors import load_weights
        from kimi_linear.models.init import init_weights

        if config is None:  # callers that parsed config.json already pass it (parsed once per process)
            config = ModelConfig.from_pretrained(path, **config_overrides)
        if dtype == "auto":
            dtype = None
        model = cls.from_config(config, device=device, dtype=dtype)
        if load_format == "dummy":
            init_weights(model, seed=seed)
        elif load_format == "auto":
            load_weights(model, path, progress=progress)
        else:
            from kimi_linear.errors import ConfigError
            raise ConfigError("load_format", f"must be 'auto' or 'dummy', got {load_format!r}")
        return model

    # ------------------------------------------------------------------ cache
    @staticmethod
    def cache_specs(config: ModelConfig, dtype: torch.dtype) -> list:
        """The cache spec of each layer (`layers/cache_spec.py`), cache tensors in `dtype` except where a
        layer fixes its own (KDA's fp32 recurrent state). Works from the config alone, so memory can be
        sized before (or without) a model."""
        return [MIXERS[kind].cache_spec(config, dtype) for kind in config.layer_types]

    def make_cache(self, num_blocks: int, block_size: int, num_slots: int, device: torch.device | str,
                   dtype: torch.dtype) -> ModelCache:
        """Zeroed cache tensors for every layer: `num_blocks` blocks of `block_size` tokens for the paged
        layers, `num_slots` state slots for the others."""
        return ModelCache(self.cache_specs(self.config, dtype), num_blocks, block_size, num_slots, device)

    # ------------------------------------------------------------------ forward
    def forward_flat(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [N] (the new tokens of all sequences back to back) -> final hidden [N, D]."""
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids [B, T] int64 -> logits [B, T, vocab] in the model dtype.

        `cache` is a `SequenceCache` for B sequences: the call appends the T tokens to each sequence.
        Without a cache each row is processed from scratch and nothing is kept.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None:
            ctx = ForwardContext.for_prefill([T] * B, input_ids.device)
        else:
            ctx = cache.begin_step([T] * B)
        hidden = self.forward_flat(input_ids.reshape(-1), ctx)
        if cache is not None:
            cache.end_step()
        return self.compute_logits(hidden).view(B, T, -1)

    # ------------------------------------------------------------------ checkpoint layout
    def checkpoint_layout(self) -> dict[str, tuple[str, tuple | None, tuple[int, ...]]]:
        """Official tensor name -> (parameter name, index into the parameter or None, shape).

        Stacked experts map `...experts.{e}.w1.weight` to (`...experts.w13_weight`, (e, slice(0, I)))
        and so on; every other tensor maps to the parameter of the same name.
        """
        layout = {}
        params = dict(self.named_parameters())
        I = self.config.moe_intermediate_size
        for name, p in params.items():
            if name.endswith("experts.w13_weight"):
                base = name[: -len("w13_weight")]
                for e in range(p.shape[0]):
                    layout[f"{base}{e}.w1.weight"] = (name, (e, slice(0, I)), (I, p.shape[2]))
                    layout[f"{base}{e}.w3.weight"] = (name, (e, slice(I, 2 * I)), (I, p.shape[2]))
            elif name.endswith("experts.w2_weight"):
                base = name[: -len("w2_weight")]
                for e in range(p.shape[0]):
                    layout[f"{base}{e}.w2.weight"] = (name, (e,), tuple(p.shape[1:]))
            else:
                layout[name] = (name, None, tuple(p.shape))
        if self.config.tie_word_embeddings:
            layout.pop("lm_head.weight", None)
        return layout

    @staticmethod
    def canonical_tensor_name(name: str, config: ModelConfig) -> str:
        """Map accepted aliases to official names. transformers' save_pretrained writes the dense
        layers' MLP under `block_sparse_moe.` (it renames every `.mlp.`); the official name is `.mlp.`."""
        m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.((?:gate|up|down)_proj\.weight)$", name)
        if m and int(m.group(1)) < config.num_hidden_layers and config.mlp_types[int(m.group(1))] == "dense":
            return f"model.layers.{m.group(1)}.mlp.{m.group(2)}"
        return name
