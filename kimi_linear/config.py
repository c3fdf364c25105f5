"""Model configuration: the official `config.json` translated once into our own names.

`ModelConfig.from_pretrained(dir)` reads a Hugging Face `config.json` of a Kimi Linear checkpoint
(the official one, or one written by transformers' native `KimiLinearConfig`), validates it, and
derives each layer's kinds:

- token mixer: "kda" (Kimi Delta Attention, a forget gate per channel), "gdn" (gated delta net: the same
  layer with one forget-gate value per head, broadcast over the head's K channels) or "mla" (full
  attention, NoPE). The layer lists of `linear_attn_config` are 1-based: layer i (0-based) is linear
  attention iff (i + 1) is in `kda_layers`, full attention iff it is in `full_attn_layers`. Our own
  optional key `linear_attn_config.gdn_layers` (1-based, a subset of `kda_layers`) makes those linear
  layers GDN. Their checkpoint names are KDA's; only two shapes change: `self_attn.f_b_proj.weight`
  [H, K] (instead of [H * K, K]) and `self_attn.dt_bias` [H] (instead of [H * K]). A config without the
  key loads as before (all linear layers KDA) and `to_hf_dict` then writes no such key, so transformers
  reads it unchanged; a config with GDN layers still tells other readers the true linear/full split
  (same cache shapes), and transformers refuses its checkpoint on the two shapes rather than misreading
  it.
- FFN: "dense" (SwiGLU of `intermediate_size`) or "moe" (routed experts plus shared experts).

Every invalid value raises `ConfigError` naming the key. Unknown keys are ignored, like
transformers does. `to_hf_dict()` writes the official format back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kimi_linear.errors import ConfigError

ARCHITECTURE = "KimiLinearForCausalLM"
MODEL_TYPE = "kimi_linear"

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(value: Any, key: str = "dtype") -> torch.dtype:
    """Turn "bfloat16" / "float32" / torch.dtype into a torch.dtype, or raise ConfigError."""
    if isinstance(value, torch.dtype):
        if value not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(key, f"unsupported dtype {value}; use bfloat16, float16 or float32")
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.").lower()
        if name in _DTYPES:
            return _DTYPES[name]
    raise ConfigError(key, f"unsupported dtype {value!r}; use bfloat16, float16 or float32")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Kimi Linear model, in our names (see module docstring)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense MLP width (layers < first_k_dense_replace)
    rms_norm_eps: float
    # MLA (full attention, NoPE)
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # KDA (linear attention)
    kda_num_heads: int
    kda_head_dim: int
    conv_kernel_size: int
    # MoE
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    moe_renormalize: bool
    num_expert_group: int
    topk_group: int
    # derived per-layer kinds
    layer_types: tuple[str, ...]  # "kda" | "gdn" | "mla"
    mlp_types: tuple[str, ...]  # "dense" | "moe"
    # tokens and misc
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    max_position: int = 1048576
    torch_dtype: torch.dtype = torch.bfloat16
    initializer_range: float = 0.02
    # kv_a_layernorm: transformers (native and remote code) builds it with the class default 1e-6
    mla_kv_norm_eps: float = 1e-6
    # Router weights: False = gathered from the unbiased sigmoid scores (transformers 5.x, vLLM,
    # SGLang). True = from the bias-corrected scores (the original remote code's aliasing quirk).
    moe_biased_weights: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---------------------------------------------------------------- derived properties
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per MLA layer: the normalised latent and the shared key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kda_dim(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    @property
    def kda_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "kda"]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "gdn"]

    @property
    def linear_layers(self) -> list[int]:
        """KDA and GDN layers (0-based): those listed in the checkpoint's `kda_layers`."""
        return [i for i, t in enumerate(self.layer_types) if t in ("kda", "gdn")]

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "mla"]

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        """Read `path/config.json` (or a config.json path) and validate it."""
        path = os.fspath(path)
        cfg_path = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError("config.json", f"no config.json found at {cfg_path}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError("config.json", f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("config.json", f"{cfg_path} must hold a JSON object")
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ModelConfig":
        """Translate and validate a Hugging Face config dict."""
        archs = d.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or ARCHITECTURE not in archs:
                raise ConfigError("architectures", f"expected [{ARCHITECTURE!r}], got {archs!r}")
        mt = d.get("model_type")
        if mt is not None and mt != MODEL_TYPE:
            raise ConfigError("model_type", f"expected {MODEL_TYPE!r}, got {mt!r}")
        if archs is None and mt is None:
            raise ConfigError("architectures", "missing: this does not look like a Kimi Linear config")

        def get_int(key: str, *aliases: str, default=None, minimum: int = 1) -> int:
            for k in (key, *aliases):
                if k in d and d[k] is not None:
                    v = d[k]
                    break
            else:
                if default is None:
                    raise ConfigError(key, "missing")
                v = default
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(key, f"must be an integer, got {v!r}")
            if v < minimum:
                raise ConfigError(key, f"must be >= {minimum}, got {v}")
            return v

        def get_float(key: str, default=None, positive: bool = True) -> float:
            v = d.get(key, default)
            if v is None:
                raise ConfigError(key, "missing")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(key, f"must be a number, got {v!r}")
            if positive and not v > 0:
                raise ConfigError(key, f"must be > 0, got {v}")
            return float(v)

        num_layers = get_int("num_hidden_layers")
        hidden = get_int("hidden_size")
        vocab = get_int("vocab_size")

        # --- MLA
        heads = get_int("num_attention_heads")
        kv_heads = get_int("num_key_value_heads", default=heads)
        if kv_heads != heads:
            raise ConfigError("num_key_value_heads",
                              f"MLA has no GQA: must equal num_attention_heads ({heads}), got {kv_heads}")
        if d.get("q_lora_rank") is not None:
            raise ConfigError("q_lora_rank", f"must be null for Kimi Linear (direct q_proj), got {d['q_lora_rank']!r}")
        if d.get("mla_use_nope", True) is not True:
            raise ConfigError("mla_use_nope", "must be true: Kimi Linear's MLA uses no rotary embedding")
        kv_lora_rank = get_int("kv_lora_rank")
        qk_nope = get_int("qk_nope_head_dim")
        qk_rope = get_int("qk_rope_head_dim", minimum=0)
        v_head = get_int("v_head_dim")

        # --- KDA
        lac = d.get("linear_attn_config")
        if lac is not None and not isinstance(lac, dict):
            raise ConfigError("linear_attn_config", f"must be an object, got {type(lac).__name__}")
        lac = lac or {}

        def lac_int(key: str, flat_key: str, default: int) -> int:
            v = lac.get(key, d.get(flat_key, default))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"linear_attn_config.{key}", f"must be a positive integer, got {v!r}")
            return v

        kda_heads = lac_int("num_heads", "linear_num_heads", 32)
        kda_head_dim = lac_int("head_dim", "linear_head_dim", 128)
        conv_k = lac_int("short_conv_kernel_size", "linear_conv_kernel_dim", 4)
        if conv_k < 2:
            raise ConfigError("linear_attn_config.short_conv_kernel_size", f"must be >= 2, got {conv_k}")
        for bad in ("use_full_rank_gate", "gate_lower_bound"):
            if lac.get(bad) not in (None, False):
                raise ConfigError(f"linear_attn_config.{bad}", "is not supported by Kimi Linear")

        layer_types = cls._layer_types(d, lac, num_layers)

        # --- FFN
        num_experts = get_int("num_experts", "num_local_experts", default=0, minimum=0)
        first_dense = get_int("first_k_dense_replace", default=0, minimum=0)
        freq = get_int("moe_layer_freq", default=1)
        mlp_types = cls._mlp_types(d, num_layers, num_experts, first_dense, freq)
        has_moe = "moe" in mlp_types
        has_dense = "dense" in mlp_types
        intermediate = get_int("intermediate_size") if has_dense else get_int("intermediate_size", default=1)
        if has_moe:
            top_k = get_int("num_experts_per_token", "num_experts_per_tok")
            if top_k > num_experts:
                raise ConfigError("num_experts_per_token", f"{top_k} exceeds num_experts ({num_experts})")
            shared = get_int("num_shared_experts", "n_shared_experts", default=0, minimum=0)
            moe_inter = get_int("moe_intermediate_size")
            groups = get_int("num_expert_group", "n_group", default=1)
            if num_experts % groups:
                raise ConfigError("num_expert_group", f"{groups} does not divide num_experts ({num_experts})")
            topk_group = get_int("topk_group", default=groups)
            if topk_group > groups:
                raise ConfigError("topk_group", f"{topk_group} exceeds num_expert_group ({groups})")
            if topk_group * (num_experts // groups) < top_k:
                raise ConfigError("topk_group",
                                  f"{topk_group} groups of {num_experts // groups} experts cannot hold top-{top_k}")
            if groups > 1 and num_experts // groups < 2:
                raise ConfigError("num_expert_group", "grouped top-k needs at least 2 experts per group")
            act = d.get("moe_router_activation_func", "sigmoid")
            if act != "sigmoid":
                raise ConfigError("moe_router_activation_func", f"only 'sigmoid' is supported, got {act!r}")
            scaling = get_float("routed_scaling_factor", default=1.0)
            renorm = d.get("moe_renormalize", d.get("norm_topk_prob", True))
            if not isinstance(renorm, bool):
                raise ConfigError("moe_renormalize", f"must be a boolean, got {renorm!r}")
        else:
            top_k, shared, moe_inter, groups, topk_group, scaling, renorm = 0, 0, 1, 1, 1, 1.0, True
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError("hidden_act", f"only 'silu' is supported, got {act!r}")

        eps = get_float("rms_norm_eps", default=1e-5)
        eos = d.get("eos_token_id")
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, int) and not isinstance(eos, bool):
            eos_ids = (eos,)
        elif isinstance(eos, list) and all(isinstance(e, int) for e in eos):
            eos_ids = tuple(eos)
        else:
            raise ConfigError("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
        for key in ("bos_token_id", "pad_token_id"):
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(key, f"must be an integer or null, got {v!r}")
        dtype_val = d.get("dtype", d.get("torch_dtype", "bfloat16")) or "bfloat16"
        torch_dtype = parse_dtype(dtype_val, "dtype")
        max_pos = d.get("model_max_length", d.get("max_position_embeddings", 1048576)) or 1048576
        if isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos < 1:
            raise ConfigError("model_max_length", f"must be a positive integer, got {max_pos!r}")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError("tie_word_embeddings", f"must be a boolean, got {tie!r}")

        cfg = cls(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers,
            intermediate_size=intermediate, rms_norm_eps=eps,
            num_attention_heads=heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope,
            qk_rope_head_dim=qk_rope, v_head_dim=v_head,
            kda_num_heads=kda_heads, kda_head_dim=kda_head_dim, conv_kernel_size=conv_k,
            num_experts=num_experts if has_moe else 0, num_experts_per_token=top_k,
            num_shared_experts=shared, moe_intermediate_size=moe_inter,
            routed_scaling_factor=scaling, moe_renormalize=renorm,
            num_expert_group=groups, topk_group=topk_group,
            layer_types=tuple(layer_types), mlp_types=tuple(mlp_types),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=d.get("pad_token_id"),
            tie_word_embeddings=tie, max_position=max_pos, torch_dtype=torch_dtype,
            initializer_range=float(d.get("initializer_range", 0.02)),
            raw=dict(d),
        )
        return cfg.replace(**overrides) if overrides else cfg

    @staticmethod
    def _layer_types(d: dict, lac: dict, num_layers: int) -> list[str]:
        from_lists = None
        if "kda_layers" in lac or "full_attn_layers" in lac:
            lists = {}
            for key in ("kda_layers", "full_attn_layers"):
                v = lac.get(key)
                if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                    raise ConfigError(f"linear_attn_config.{key}", f"must be a list of 1-based layer numbers, got {v!r}")
                for i in v:
                    if not 1 <= i <= num_layers:
                        raise ConfigError(f"linear_attn_config.{key}",
                                          f"layer {i} is out of range 1..{num_layers} (the lists are 1-based)")
                if len(set(v)) != len(v):
                    raise ConfigError(f"linear_attn_config.{key}", f"lists a layer twice: {v}")
                lists[key] = set(v)
            both = lists["kda_layers"] & lists["full_attn_layers"]
            if both:
                raise ConfigError("linear_attn_config.kda_layers",
                                  f"layers {sorted(both)} are in both kda_layers and full_attn_layers")
            missing = set(range(1, num_layers + 1)) - lists["kda_layers"] - lists["full_attn_layers"]
            if missing:
                raise ConfigError("linear_attn_config.kda_layers",
                                  f"layers {sorted(missing)} are in neither kda_layers nor full_attn_layers "
                                  f"(every layer 1..{num_layers} must be listed exactly once)")
            from_lists = ["kda" if (i + 1) in lists["kda_layers"] else "mla" for i in range(num_layers)]
        from_types = None
        if d.get("layer_types") is not None:
            lt = d["layer_types"]
            names = {"linear_attention": "kda", "full_attention": "mla"}
            if not isinstance(lt, list) or len(lt) != num_layers or not all(t in names for t in lt):
                raise ConfigError("layer_types",
                                  f"must list {num_layers} entries of 'linear_attention'/'full_attention', got {lt!r}")
            from_types = [names[t] for t in lt]
        if from_lists is not None and from_types is not None and from_lists != from_types:
            raise ConfigError("layer_types", "disagrees with linear_attn_config.kda_layers/full_attn_layers")
        result = from_lists or from_types
        if result is None:
            raise ConfigError("linear_attn_config",
                              "missing: need linear_attn_config.kda_layers and full_attn_layers")
        gdn = lac.get("gdn_layers")
        if gdn is not None:
            key = "linear_attn_config.gdn_layers"
            if not isinstance(gdn, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in gdn):
                raise ConfigError(key, f"must be a list of 1-based layer numbers, got {gdn!r}")
            if len(set(gdn)) != len(gdn):
                raise ConfigError(key, f"lists a layer twice: {gdn}")
            for i in gdn:
                if not 1 <= i <= num_layers:
                    raise ConfigError(key, f"layer {i} is out of range 1..{num_layers} (the lists are 1-based)")
                if result[i - 1] != "kda":
                    raise ConfigError(key, f"layer {i} is not a linear-attention layer: GDN layers must also "
                                           "be listed in kda_layers")
                result[i - 1] = "gdn"
        return result

    @staticmethod
    def _mlp_types(d: dict, num_layers: int, num_experts: int, first_dense: int, freq: int) -> list[str]:
        derived = ["moe" if (num_experts > 0 and i >= first_dense and i % freq == 0) else "dense"
                   for i in range(num_layers)]
        mt = d.get("mlp_layer_types")
        if mt is None:
            return derived
        names = {"dense": "dense", "sparse": "moe"}
        if not isinstance(mt, list) or len(mt) != num_layers or not all(t in names for t in mt):
            raise ConfigError("mlp_layer_types", f"must list {num_layers} entries of 'dense'/'sparse', got {mt!r}")
        explicit = [names[t] for t in mt]
        if "moe" in explicit and num_experts == 0:
            raise ConfigError("num_experts", "mlp_layer_types has sparse layers but num_experts is 0")
        return explicit

    # ---------------------------------------------------------------- writing
    def to_hf_dict(self) -> dict:
        """The official config.json layout (what `kimi-linear init` writes)."""
        kda = [i + 1 for i in self.linear_layers]
        full = [i + 1 for i, t in enumerate(self.layer_types) if t == "mla"]
        first_dense = next((i for i, t in enumerate(self.mlp_types) if t == "moe"), self.num_hidden_layers)
        dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[self.torch_dtype]
        eos: int | list[int] | None = (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                                       else (self.eos_token_ids[0] if self.eos_token_ids else None))
        d = {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "q_lora_rank": None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "mla_use_nope": True,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "model_max_length": self.max_position,
            "num_experts": self.num_experts,
            "num_experts_per_token": self.num_experts_per_token,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "first_k_dense_replace": first_dense,
            "moe_layer_freq": 1,
            "moe_router_activation_func": "sigmoid",
            "moe_renormalize": self.moe_renormalize,
            "routed_scaling_factor": self.routed_scaling_factor,
            "use_grouped_topk": True,
            "num_expert_group": self.num_expert_group,
            "topk_group": self.topk_group,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype_name,
            "initializer_range": self.initializer_range,
            "use_cache": True,
            "linear_attn_config": {
                "kda_layers": kda,
                "full_attn_layers": full,
                "num_heads": self.kda_num_heads,
                "head_dim": self.kda_head_dim,
                "short_conv_kernel_size": self.conv_kernel_size,
            },
        }
        if self.gdn_layers:  # only then: a config without GDN layers is written exactly as the official one
            d["linear_attn_config"]["gdn_layers"] = [i + 1 for i in self.gdn_layers]
        # If the FFN pattern is not expressible by first_k_dense_replace, write it explicitly.
        derived = ["moe" if (self.num_experts > 0 and i >= first_dense) else "dense"
                   for i in range(self.num_hidden_layers)]
        if derived != list(self.mlp_types):
            d["mlp_layer_types"] = ["sparse" if t == "moe" else "dense" for t in self.mlp_types]
        return d

    def num_parameters(self) -> int:
        """Total parameter count implied by the config (all experts counted)."""
        D = self.hidden_size
        C = self.kda_dim
        kda = 3 * C * D + 3 * C * self.conv_kernel_size + self.kda_num_heads + C \
            + 2 * (self.kda_head_dim * D + C * self.kda_head_dim) + self.kda_num_heads * D \
            + self.kda_head_dim + D * C
        gdn = kda - (C - self.kda_num_heads) * (self.kda_head_dim + 1)  # f_b_proj [H, K], dt_bias [H]
        H = self.num_attention_heads
        mla = H * self.qk_head_dim * D + self.kv_cache_dim * D + self.kv_lora_rank \
            + H * (self.qk_nope_head_dim + self.v_head_dim) * self.kv_lora_rank + D * H * self.v_head_dim
        dense = 3 * D * self.intermediate_size
        moe = self.num_experts * 3 * D * self.moe_intermediate_size + self.num_experts * (D + 1) \
            + 3 * D * self.moe_intermediate_size * self.num_shared_experts
        total = self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        for lt, mt in zip(self.layer_types, self.mlp_types):
            total += 2 * D + {"kda": kda, "gdn": gdn, "mla": mla}[lt] + (moe if mt == "moe" else dense)
        return total
