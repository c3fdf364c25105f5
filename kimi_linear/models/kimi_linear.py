"""KimiLinearForCausalLM: the decoder stack (spec section 2) and its two entry points.

- `model(input_ids [B, T], cache=None) -> logits [B, T, vocab]`: direct use, with an optional
  `SequenceCache` so that prefill, chunked prefill and token-by-token decode give the same logits.
- `model.forward_flat(input_ids [N], ctx) -> hidden [N, D]` and `model.compute_logits(hidden)`: the
  engine's interface, over a flat batch described by a ForwardContext.
- `cache_specs(config, dtype)`: what each layer keeps between passes (its mixer's `cache_spec`), from
  which the engine sizes memory; `model.make_cache(...)` allocates a ModelCache from them.
- Training: `model(input_ids [1, L], cu_seqlens=cu, labels=labels) -> TrainOutput(loss_sum, num_tokens,
  aux_loss)` over one packed row of documents that never see each other (KDA state and conv window reset
  at each document start, MLA attention masked per document, MoE per token); the logits are never
  materialised whole (`ops.loss.linear_cross_entropy`). `model(input_ids [1, L], cu_seqlens=cu)` gives
  the row's logits [1, L, vocab]. `gradient_checkpointing_enable(every=N)` recomputes every Nth decoder layer in the
  backward; `set_moe_aux_loss_coef(coef)` turns on the MoE sequence-level balance loss.

Parameter names equal the checkpoint's, except the routed experts, which are stacked per layer
(`experts.w13_weight`, `experts.w2_weight`); `checkpoint_layout()` gives the mapping both ways.
Projections that read the same input are stored as rows of one tensor (`tie_fused_weights`) so that
inference runs them as one GEMM; the decoder's residual adds are folded into the next norm's kernel, and
in an MoE layer the post-attention norm into the router's launch at decode (`MoE.norm_forward`).
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

import torch.utils.checkpoint

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.layers.fused import materialize, no_fusion, tie_all
from kimi_linear.layers.linear import bind_fp8
from kimi_linear.layers.kda import GatedDeltaNet, KimiDeltaAttention
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.layers.moe import MoE
from kimi_linear.layers.norm import Branch, RMSNorm
from kimi_linear.models.cache import ModelCache
from kimi_linear.models.context import ForwardContext
from kimi_linear.models.outputs import TrainOutput
from kimi_linear.models.quant import apply_fp8
from kimi_linear.ops.loss import linear_cross_entropy

IGNORE_INDEX = -100  # labels that take no loss

# Parameters that stay fp32 whatever the model dtype (spec section 3.2 / 8.13).
FP32_PARAMS = re.compile(r"(\.A_log|\.dt_bias|\.e_score_correction_bias)$")

# The token mixer of each `config.layer_types` kind; each declares its cache (`cache_spec`).
MIXERS = {"kda": KimiDeltaAttention, "gdn": GatedDeltaNet, "mla": MultiHeadLatentAttention}


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
        branch = self.self_attn(h, ctx)
        if self.is_moe:  # the post-attention norm folded into the router's launch (decode)
            return self.block_sparse_moe.norm_forward(self.post_attention_layernorm, branch, residual, reduce=False,
                                                      cu_seqlens=ctx.cu_seqlens)
        h, residual = self.post_attention_layernorm.add(branch, residual)
        return self.mlp(h), residual

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE balance loss of this layer's last training forward (None when off or dense)."""
        return self.block_sparse_moe.pop_aux_loss() if self.is_moe else None


def _run_layer(layer: KimiLinearDecoderLayer, x, ctx: ForwardContext, residual):
    """One decoder layer (through its __call__, so module hooks such as FSDP's run) and its aux loss."""
    x, residual = layer(x, ctx, residual)
    return x, residual, layer.aux_loss()


class KimiLinearModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.gradient_checkpointing_every = 1  # with checkpointing on, recompute layers 0, N, 2N, ...
        self.aux_losses: list[torch.Tensor] = []  # the MoE balance losses of the last forward

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        self.aux_losses = []
        every = self.gradient_checkpointing_every
        for i, layer in enumerate(self.layers):
            if checkpointing and i % every == 0:
                x, residual, aux = torch.utils.checkpoint.checkpoint(_run_layer, layer, x, ctx, residual,
                                                                     use_reentrant=False)
            else:
                x, residual, aux = _run_layer(layer, x, ctx, residual)
            if aux is not None:
                self.aux_losses.append(aux)
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
                    dtype: torch.dtype | str | None = None, fp8_modules=None,
                    fp8_block: tuple[int, int] | None = None) -> "KimiLinearForCausalLM":
        """Build with uninitialised storage on `device` in `dtype` (A_log, dt_bias and the router's
        correction bias stay fp32). Fill it with `load_weights` or `init_weights`.
        `fp8_modules`: names of modules built in FP8 instead (`models/quant.py`; float8_e4m3fn weights with
        fp32 scales per output channel, or per `fp8_block`), never allocated in `dtype` first."""
        device = torch.device(device or "cpu")
        dtype = parse_dtype(dtype, "dtype") if dtype is not None else config.torch_dtype
        with torch.device("meta"):
            model = cls(config)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if FP32_PARAMS.search(name) else dtype)
        if fp8_modules:
            with torch.device("meta"):
                apply_fp8(model, fp8_modules, fp8_block)
        materialize(model, device)  # to_empty, with each fused group allocated as one tensor
        for b in model.buffers():  # statistics (MoE tokens_per_expert) start at zero
            b.zero_()
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.tie_fused_weights()  # no-op unless a group could not be placed as one tensor
        bind_fp8(model)  # FP8 weights know their scales (the fused views tie those too)
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
                        quantization: str | None = None, **config_overrides) -> "KimiLinearForCausalLM":
        """Load a Hugging Face checkpoint folder (config.json + safetensors) straight onto `device`.

        dtype: None/"auto" = the checkpoint's dtype. load_format: "auto" reads the weights, "dummy"
        fills random well-scaled weights from config.json alone (same shapes, for benchmarks).
        FP8: a checkpoint with a `quantization_config` (compressed-tensors FP8 or block-wise "fp8") loads
        its FP8 tensors as they are; `quantization="fp8"` quantizes a bf16 checkpoint's projections and
        experts per output channel while loading, tensor by tensor (with "dummy": the random weights are
        drawn as for the bf16 model, then quantized). See `loader/quant.py`.
        """
        from kimi_linear.loader.quant import plan_quantized_load
        from kimi_linear.loader.safetensors import load_weights
        from kimi_linear.models.init import init_weights

        if config is None:  # callers that parsed config.json already pass it (parsed once per process)
            config = ModelConfig.from_pretrained(path, **config_overrides)
        if dtype == "auto":
            dtype = None
        if load_format not in ("auto", "dummy"):
            from kimi_linear.errors import ConfigError
            raise ConfigError("load_format", f"must be 'auto' or 'dummy', got {load_format!r}")
        plan = plan_quantized_load(cls, config, path, quantization, read_checkpoint=load_format == "auto")
        model = cls.from_config(config, device=device, dtype=dtype,
                                fp8_modules=plan.fp8_modules if plan else None, fp8_block=plan.block if plan else None)
        if load_format == "dummy":
            init_weights(model, seed=seed)
        else:
            load_weights(model, path, progress=progress, plan=plan)
        return model

    # ------------------------------------------------------------------ cache
    @staticmethod
    def cache_specs(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None) -> list:
        """The cache spec of each layer (`layers/cache_spec.py`), cache tensors in `dtype` except where a
        layer fixes its own (KDA's fp32 recurrent state); the MLA latent cache in `kv_cache_dtype` when
        given (float8_e4m3fn: `--kv-cache-dtype fp8`). Works from the config alone, so memory can be sized
        before (or without) a model."""
        return [MultiHeadLatentAttention.cache_spec(config, dtype, kv_cache_dtype) if kind == "mla"
                else MIXERS[kind].cache_spec(config, dtype) for kind in config.layer_types]

    def make_cache(self, num_blocks: int, block_size: int, num_slots: int, device: torch.device | str,
                   dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None) -> ModelCache:
        """Zeroed cache tensors for every layer: `num_blocks` blocks of `block_size` tokens for the paged
        layers, `num_slots` state slots for the others."""
        return ModelCache(self.cache_specs(self.config, dtype, kv_cache_dtype), num_blocks, block_size, num_slots,
                          device)

    # ------------------------------------------------------------------ forward
    def forward_flat(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [N] (the new tokens of all sequences back to back) -> final hidden [N, D]."""
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, cache=None, *, cu_seqlens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """input_ids [B, T] int64 -> logits [B, T, vocab] in the model dtype.

        `cache` is a `SequenceCache` for B sequences: the call appends the T tokens to each sequence.
        Without a cache each row is processed from scratch and nothing is kept.

        Training call: input_ids [1, L] is one packed row, `cu_seqlens` int [D + 1] its document boundaries
        (cu[0] = 0, cu[-1] = L; None = one document), `labels` int64 [1, L] the target of each position
        (already shifted: labels[t] is predicted from tokens <= t; -100 = no loss). Returns a
        `TrainOutput(loss_sum, num_tokens, aux_loss)`; without labels, the row's logits [1, L, vocab].
        The training call never uses the fused (tied) weight views: the separate parameters serve, so it
        works on untied parameters (after `model.to(...)`, under FSDP2). It reads `lm_head.weight`
        directly (the output projection runs inside the chunked loss), so shard lm_head with the root.
        """
        if cu_seqlens is not None or labels is not None:
            if cache is not None:
                raise ValueError("the training call (cu_seqlens / labels) takes no cache")
            return self._forward_packed(input_ids, cu_seqlens, labels)
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

    def _forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                        labels: torch.Tensor | None):
        ctx = packed_context(input_ids, cu_seqlens)
        if labels is not None and (labels.shape != input_ids.shape or labels.dtype.is_floating_point
                                   or labels.dtype == torch.bool):
            raise ValueError(f"labels must be an integer tensor shaped like input_ids {tuple(input_ids.shape)}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        with no_fusion():
            hidden = self.forward_flat(input_ids.reshape(-1), ctx)
            aux_losses, self.model.aux_losses = self.model.aux_losses, []
            if labels is None:
                return self.compute_logits(hidden).view(1, hidden.shape[0], -1)
            loss_sum, num_tokens = linear_cross_entropy(hidden, self.lm_head.weight, labels.reshape(-1).to(input_ids.device),
                                                        ignore_index=IGNORE_INDEX)
        aux = torch.stack(aux_losses).sum() if aux_losses else torch.zeros((), device=hidden.device)
        return TrainOutput(loss_sum=loss_sum, num_tokens=num_tokens, aux_loss=aux.float())

    # ------------------------------------------------------------------ training switches
    def gradient_checkpointing_enable(self, every: int = 1) -> None:
        """Recompute decoder layers in the backward (non-reentrant `torch.utils.checkpoint`): only a recomputed
        layer's input is kept between forward and backward. `every=N` recomputes layers 0, N, 2N, ... only and
        keeps the others' activations (selective layer checkpointing: less recompute, less memory saved)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"gradient checkpointing: every must be an int >= 1, got {every!r}")
        self.model.gradient_checkpointing = True
        self.model.gradient_checkpointing_every = every

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def set_moe_aux_loss_coef(self, coef: float) -> None:
        """Coefficient of the MoE sequence-level balance loss (`layers/moe.py`); 0 (the default) turns it off."""
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
            raise ValueError(f"moe aux loss coefficient must be a number >= 0, got {coef!r}")
        for module in self.modules():
            if isinstance(module, MoE):
                module.aux_loss_coef = float(coef)

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks in layer order (each has `tokens_per_expert` and `gate.e_score_correction_bias`)."""
        return [layer.block_sparse_moe for layer in self.model.layers if layer.is_moe]

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
            m = re.search(r"experts\.(w13|w2)_weight(_scale|_scale_inv)?$", name)
            if m and m.group(1) == "w13":  # FP8 scales stack like the weights: w1 rows, then w3 rows
                base, sfx = name[: m.start()] + "experts.", m.group(2) or ""
                h = I if not sfx else p.shape[1] // 2
                for e in range(p.shape[0]):
                    layout[f"{base}{e}.w1.weight{sfx}"] = (name, (e, slice(0, h)), (h, p.shape[2]))
                    layout[f"{base}{e}.w3.weight{sfx}"] = (name, (e, slice(h, 2 * h)), (h, p.shape[2]))
            elif m:
                base, sfx = name[: m.start()] + "experts.", m.group(2) or ""
                for e in range(p.shape[0]):
                    layout[f"{base}{e}.w2.weight{sfx}"] = (name, (e,), tuple(p.shape[1:]))
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


def packed_context(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> ForwardContext:
    """The cache-less context of one packed row input_ids [1, L] with document boundaries `cu_seqlens`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the training call takes one packed row: input_ids must be [1, L], got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    L = input_ids.shape[1]
    if L == 0:
        raise ValueError("input_ids is empty: a packed row needs at least one token")
    if cu_seqlens is None:
        cu = [0, L]
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [D + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != L:
            raise ValueError(f"cu_seqlens must start at 0 and end at L = {L}, got {cu[0]} .. {cu[-1]}")
        if any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {cu}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    return ForwardContext(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=input_ids.device),
                          query_lens=lens, context_lens=[0] * len(lens), max_seq_len=max(lens))
