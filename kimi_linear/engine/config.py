"""EngineConfig: the engine's knobs (vLLM names), validated once, plus the checkpoint's generation config.

`EngineConfig` holds what the user asked for; every invalid value raises `ConfigError` naming the
field, never a bare assert. Each field's default lives here only: the CLI generates its engine flags
from these fields (`--max-num-seqs` <-> `max_num_seqs`, help text from the field's metadata, see
`cli/engine_args.py`) and `LLM(**kwargs)` passes them through.

Knobs meant for tests and benchmarks: `block_size` (tokens per MLA cache block, a power of two: the
MLA decode kernel's constraint), `num_gpu_blocks_override` / `num_state_slots_override` (skip memory
sizing), and `max_cuda_graph_batch_size` (largest captured decode batch; default max_num_seqs).
`structured_outputs_any_whitespace` (default False): JSON constrained output allows free whitespace
between tokens; off, JSON comes in one line with ", " / ": " separators, a guard against models that
loop on whitespace (vLLM's `disable_any_whitespace`, inverted).

`async_scheduling` (on by default, `--no-async-scheduling` turns it off; on the H200 it hides the host work of a
decode step: TPOT minus graph replay 0.26-0.36 ms off, 0.09 ms on, benchmarks/RESULTS.md): the host schedules step t+1 and
launches it before reading step t's tokens back, and processes step t's outputs while t+1 runs
(`engine/overlap.py`, which lists the batches that fall back to one step at a time). Independent of
`enforce_eager` (CUDA graphs).

Prefix caching (`engine/prefix_cache.py`), on by default as in vLLM: `enable_prefix_caching`
(`--no-enable-prefix-caching` turns it off), `prefix_caching_hash_algo` (sha256 or xxhash) and
`prefix_cache_state_fraction`, the share of the cache memory given to KDA state snapshots (the
snapshot pool; `num_state_snapshots_override` fixes its size instead, 0 allowed).

vLLM compatibility fields accept what vLLM recipes pass: `trust_remote_code` (no effect: the model code
is built in) and `tensor_parallel_size` (1 only); `notices()` lists the one-line notices the engine logs.
FP8 (`loader/quant.py`): `quantization="fp8"` quantizes a bf16 checkpoint on load (FP8 checkpoints need no
flag); `kv_cache_dtype="fp8"` stores the MLA latent cache in float8_e4m3fn.
`generation_config`: "auto" (the checkpoint's generation_config.json gives the sampling defaults),
"vllm" (no sampling defaults; EOS ids still come from the checkpoint's file, as in vLLM) or a folder
to read generation_config.json from. `chat_template`: a file path or an inline template.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.engine.block_hash import HASH_ALGOS
from kimi_linear.errors import ConfigError, KimiLinearError, ValidationError
from kimi_linear.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
MAX_LOGPROBS_LIMIT = 20  # the sampler's memory profile (engine/memory.py) assumes at most 20 top logprobs
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_JINJA_CHARS = "{}\n"


def knob(default, help: str, **cli) -> Any:
    """A config field with its CLI help text. `cli` options for the generated flag: size=True (accepts 32K,
    1M), choices=(...), aliases=("-x",), negatable=True (--x / --no-x), metavar="..."."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint folder (config.json [+ safetensors] [+ tokenizer]); a positional argument in the CLI
    device: str | None = knob(None, "cuda or cpu (default: cuda when available)")
    dtype: Any = knob(None, "auto (the checkpoint's), bfloat16, float16 or float32 (default: auto)", metavar="DTYPE")
    max_model_len: int | None = knob(None, "context length, accepts 32K, 1M (default: the config's model_max_length, "
                                           "capped by the cache size)", size=True)
    max_num_seqs: int = knob(256, "maximum running requests (= KDA state slots wanted)", size=True)
    max_num_batched_tokens: int = knob(8192, "token budget of one step (prefill chunks + decodes)", size=True)
    gpu_memory_utilization: float = knob(0.9, "fraction of the GPU memory this engine may use")
    enforce_eager: bool = knob(False, "disable CUDA graphs")
    async_scheduling: bool = knob(True, "schedule and prepare the next step while the GPU runs the current one "
                                        "(one step in flight; same tokens)",
                                  negatable=True)
    seed: int = knob(0, "global RNG seed (requests without their own seed)")
    load_format: str = knob("auto", "auto = read the weights; dummy = random weights from config.json (benchmarks)",
                            choices=("auto", "dummy"))
    tokenizer: str | None = knob(None, "folder with the tokenizer files (default: the model folder)")
    chat_template: str | None = knob(None, "chat template: a file path or an inline Jinja template (overrides the "
                                           "checkpoint's)")
    generation_config: str = knob("auto", "auto: sampling defaults from the checkpoint's generation_config.json; "
                                          "vllm: ignore them; or a FOLDER to read generation_config.json from",
                                  metavar="{auto,vllm,FOLDER}")
    max_logprobs: int = knob(MAX_LOGPROBS_LIMIT, "most logprobs a request may ask for (logprobs, top_logprobs, "
                                                 "prompt_logprobs); at most 20")
    block_size: int = knob(64, "tokens per MLA latent-cache block (a power of two)")
    num_gpu_blocks_override: int | None = knob(None, "fixed number of MLA cache blocks (skips memory sizing)")
    num_state_slots_override: int | None = knob(None, "fixed number of KDA state slots (skips memory sizing)")
    max_cuda_graph_batch_size: int | None = knob(None, "largest captured decode batch (default: max_num_seqs)")
    cuda_graph_reserve_bytes: int = knob(512 * 1024 ** 2, "bytes kept free on CUDA for the graphs' private pool",
                                         metavar="BYTES")
    structured_outputs_any_whitespace: bool = knob(False, "JSON grammars allow free whitespace between tokens")
    enable_prefix_caching: bool = knob(True, "reuse the cached MLA blocks and KDA state snapshots of shared prompt "
                                             "prefixes (default: on)", negatable=True)
    prefix_caching_hash_algo: str = knob("sha256", "hash of the prefix cache's block chain", choices=HASH_ALGOS)
    prefix_cache_state_fraction: float = knob(0.1, "fraction of the cache memory kept for KDA state snapshots of "
                                                   "the prefix cache")
    num_state_snapshots_override: int | None = knob(None, "fixed number of prefix-cache state snapshots (0 = none)")
    # ---- vLLM compatibility: accepted so vLLM recipes run; see notices()
    trust_remote_code: bool = knob(False, "accepted for vLLM compatibility; no effect (the model code is built in)")
    tensor_parallel_size: int = knob(1, "GPUs to shard the model over; only 1 is supported yet", aliases=("-tp",))
    quantization: str | None = knob(None, "fp8: quantize the checkpoint's linear and expert weights to FP8 per output "
                                          "channel while loading (FP8 checkpoints load as FP8 without it)",
                                    choices=("fp8", "none"))
    kv_cache_dtype: str = knob("auto", "MLA latent cache dtype: auto (the model dtype) or fp8 (float8_e4m3fn, "
                                       "static scale 1.0: half the bytes)", choices=("auto", "fp8", "fp8_e4m3"))

    def __post_init__(self):
        def pos_int(name: str, optional: bool = False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")

        def boolean(name: str, optional: bool = False):
            v = getattr(self, name)
            if not (isinstance(v, bool) or (optional and v is None)):
                raise ConfigError(name, f"must be true or false, got {v!r}")

        if not isinstance(self.model, (str, os.PathLike)):
            raise ConfigError("model", f"must be a checkpoint folder path, got {self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        _check_folder("model", self.model)
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, os.PathLike)):
                raise ConfigError("tokenizer", f"must be a folder path, got {self.tokenizer!r}")
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))
            _check_folder("tokenizer", self.tokenizer)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            pos_int(name)
        for name in ("max_model_len", "num_gpu_blocks_override", "num_state_slots_override",
                     "max_cuda_graph_batch_size"):
            pos_int(name, optional=True)
        if self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two (the MLA decode kernel's tiling), "
                                            f"got {self.block_size}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < u <= 1.0:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {u!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError("load_format", f"must be 'auto' or 'dummy', got {self.load_format!r}")
        for name in ("enforce_eager", "structured_outputs_any_whitespace", "trust_remote_code"):
            boolean(name)
        boolean("enable_prefix_caching")
        boolean("async_scheduling")
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            raise ConfigError("prefix_caching_hash_algo", f"must be one of {', '.join(HASH_ALGOS)}, "
                                                          f"got {self.prefix_caching_hash_algo!r}")
        f = self.prefix_cache_state_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigError("prefix_cache_state_fraction", f"must be in [0, 1), got {f!r}")
        ns = self.num_state_snapshots_override
        if ns is not None and (isinstance(ns, bool) or not isinstance(ns, int) or ns < 0):
            raise ConfigError("num_state_snapshots_override", f"must be a non-negative integer, got {ns!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        lp = self.max_logprobs
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS_LIMIT:
            raise ConfigError("max_logprobs", f"must be an integer in [0, {MAX_LOGPROBS_LIMIT}] (more is not "
                                              f"supported yet), got {lp!r}")
        if self.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size", f"tensor parallelism is not supported yet: it must be 1, "
                                                      f"got {self.tensor_parallel_size}")
        q = self.quantization
        if q is not None and (not isinstance(q, str) or q.lower() not in ("none", "fp8")):
            raise ConfigError("quantization", f"supported: 'fp8' (quantize on load) or none, got {q!r}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ConfigError("kv_cache_dtype", f"must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        g = self.generation_config
        if not isinstance(g, (str, os.PathLike)):
            raise ConfigError("generation_config", f"must be 'auto', 'vllm' or a folder, got {g!r}")
        object.__setattr__(self, "generation_config", os.fspath(g))
        if self.generation_config not in ("auto", "vllm"):
            _check_folder("generation_config", self.generation_config)
            if not os.path.isfile(os.path.join(self.generation_config, GENERATION_CONFIG)):
                raise ConfigError("generation_config", f"no {GENERATION_CONFIG} in {self.generation_config}")
        if self.chat_template is not None:
            self.load_chat_template()  # validates: a readable file or a template that compiles
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

    def cache_dtype(self, model_config: ModelConfig) -> torch.dtype:
        """The MLA latent cache's dtype: the model dtype, or float8_e4m3fn for kv_cache_dtype fp8."""
        return torch.float8_e4m3fn if self.kv_cache_dtype in ("fp8", "fp8_e4m3") else self.torch_dtype(model_config)

    @property
    def use_cuda_graphs(self) -> bool:
        return self.torch_device.type == "cuda" and not self.enforce_eager

    def load_model_config(self) -> ModelConfig:
        """The checkpoint's config.json, parsed and validated (callers parse it once and pass it on)."""
        return ModelConfig.from_pretrained(self.model)

    @property
    def generation_config_dir(self) -> str:
        """The folder whose generation_config.json is read (EOS ids, and the sampling defaults unless "vllm")."""
        return self.model if self.generation_config in ("auto", "vllm") else self.generation_config

    def load_chat_template(self) -> str | None:
        """The `chat_template` override as template text (None = none): a readable file's content, else the
        value itself as an inline template (with backslash escapes decoded). As in vLLM, a value with
        none of `{`, `}` or a newline that is not a readable file is a missing file (ConfigError)."""
        t = self.chat_template
        if t is None:
            return None
        if not isinstance(t, str) or not t:
            raise ConfigError("chat_template", f"must be a file path or a template, got {t!r}")
        try:
            with open(t, encoding="utf-8") as f:
                text = f.read()
        except (OSError, ValueError) as e:
            if not any(c in t for c in _JINJA_CHARS):
                why = getattr(e, "strerror", None) or str(e)
                raise ConfigError("chat_template", f"{t!r} looks like a file path, but it cannot be read: "
                                                   f"{why}") from None
            text = codecs.decode(t, "unicode_escape") if t.isascii() else t
        from kimi_linear.loader.chat_template import compile_template

        try:
            compile_template(text)
        except KimiLinearError as e:
            raise ConfigError("chat_template", str(e)) from None
        return text

    def notices(self) -> list[str]:
        """One line per option accepted for vLLM compatibility that has no effect here."""
        out = []
        if self.trust_remote_code:
            out.append("trust_remote_code has no effect: the Kimi Linear model code is built in, no remote code runs")
        return out

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

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """{field: default} of every field but `model` (the single place defaults are written)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "model"}


def _check_folder(key: str, path: str) -> None:
    """ConfigError unless `path` is a folder; a Hugging Face Hub id gets told to download it first."""
    if os.path.isdir(path):
        return
    if _HUB_ID.fullmatch(path) and not os.path.exists(path):
        raise ConfigError(key, f"{path} is not a local folder. It looks like a Hugging Face Hub id, and kimi_linear "
                               f"loads local folders only: download it first, e.g. `huggingface-cli download {path} "
                               f"--local-dir DIR`, then pass DIR")
    raise ConfigError(key, f"{path} is not a folder")


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
    out, source = {}, {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                     ("repetition_penalty", "repetition_penalty"), ("min_p", "min_p"),
                     ("max_new_tokens", "max_tokens")):
        if generation_config.get(src) is not None:
            out[dst] = generation_config[src]
            source[dst] = src
    # An invalid default would make every request that leaves the field out a 400 naming a field the client
    # never sent: refuse it here, at load, naming the file's key.
    try:
        SamplingParams(**out)
    except ValidationError as e:
        key = source.get(e.param, e.param)
        raise ConfigError(f"{GENERATION_CONFIG}.{key}", f"invalid sampling default {key}="
                                                         f"{generation_config.get(key)!r}: {e}") from None
    return out
