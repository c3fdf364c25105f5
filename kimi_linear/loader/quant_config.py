"""Which FP8 scheme a checkpoint (config.json's `quantization_config`) or the user (`quantization="fp8"`)
asks for: `QuantScheme`, validated once, every unsupported value a ConfigError naming its field.

Accepted checkpoint configs (anything else is refused at load, naming the field):
- compressed-tensors, FP8 "float-quantized" (also "naive-quantized"): `quant_method = "compressed-tensors"`,
  `format` in those two, each `config_groups.<g>.weights` = {num_bits: 8, type: "float", strategy: "channel"
  or "tensor", symmetric: true, dynamic: false}, `input_activations` null or {num_bits: 8, type: "float",
  strategy: "token", dynamic: true} (dynamic per-token scales, computed at run time), `output_activations`
  null, `kv_cache_scheme` null; `ignore` names modules left unquantized (the checkpoint tells which weights
  are FP8 anyway: a float8 weight tensor must come with its scale).
- block-wise (DeepSeek-V3 / Kimi K2): `quant_method = "fp8"`, `fmt = "e4m3"` (if given),
  `activation_scheme = "dynamic"`, `weight_block_size = [BN, BK]` (positive integers).
`on_load_scheme()` is `--quantization fp8`: the checkpoint's bf16 linear and expert weights quantized
per output channel while loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_linear.errors import ConfigError

CT_FORMATS = ("float-quantized", "naive-quantized")
KEY = "quantization_config"


@dataclass(frozen=True)
class QuantScheme:
    """method: "compressed-tensors" | "fp8" (block checkpoints) | "on-load" (`--quantization fp8`);
    block: (BN, BK) for block scales, None for per-channel (per-tensor checkpoint scales are expanded)."""
    method: str
    block: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()

    @property
    def serialized(self) -> bool:
        """Whether the checkpoint holds FP8 tensors (else they are quantized while loading)."""
        return self.method != "on-load"

    @property
    def scale_suffix(self) -> str:
        return "weight_scale" if self.block is None else "weight_scale_inv"


def on_load_scheme() -> QuantScheme:
    return QuantScheme("on-load")


def _want(cfg: dict, key: str, allowed, where: str, required: bool = True):
    v = cfg.get(key, None)
    if v is None and not required:
        return None
    if v not in allowed:
        raise ConfigError(f"{where}.{key}", f"unsupported value {v!r}; supported: {', '.join(map(repr, allowed))}")
    return v


def _compressed_tensors(q: dict) -> QuantScheme:
    _want(q, "format", CT_FORMATS, KEY)
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{KEY}.config_groups", f"must be a non-empty object of quantization groups, got {groups!r}")
    for gname, g in groups.items():
        where = f"{KEY}.config_groups.{gname}"
        if not isinstance(g, dict):
            raise ConfigError(where, f"must be an object, got {g!r}")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise ConfigError(f"{where}.weights", f"must be an object, got {w!r}")
        _want(w, "num_bits", (8,), f"{where}.weights")
        _want(w, "type", ("float",), f"{where}.weights")
        _want(w, "strategy", ("channel", "tensor"), f"{where}.weights")
        if w.get("symmetric", True) is not True:
            raise ConfigError(f"{where}.weights.symmetric", "only symmetric FP8 weights are supported")
        if w.get("dynamic", False) is not False:
            raise ConfigError(f"{where}.weights.dynamic", "dynamic weight quantization is not supported")
        if w.get("group_size") is not None or w.get("block_structure") is not None:
            raise ConfigError(f"{where}.weights.group_size", "grouped / block-structured compressed-tensors weights "
                                                             "are not supported (per-channel or per-tensor only)")
        a = g.get("input_activations")
        if a is not None:
            if not isinstance(a, dict):
                raise ConfigError(f"{where}.input_activations", f"must be an object or null, got {a!r}")
            _want(a, "num_bits", (8,), f"{where}.input_activations")
            _want(a, "type", ("float",), f"{where}.input_activations")
            _want(a, "strategy", ("token",), f"{where}.input_activations")
            if a.get("dynamic") is not True:
                raise ConfigError(f"{where}.input_activations.dynamic", "only dynamic (per-token, computed at run "
                                                                         "time) activation scales are supported")
        if g.get("output_activations") is not None:
            raise ConfigError(f"{where}.output_activations", "output activation quantization is not supported")
    if q.get("kv_cache_scheme") is not None:
        raise ConfigError(f"{KEY}.kv_cache_scheme", "a quantized KV-cache scheme in the checkpoint is not supported "
                                                    "(use --kv-cache-dtype fp8)")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{KEY}.ignore", f"must be a list of module names, got {ignore!r}")
    return QuantScheme("compressed-tensors", None, tuple(ignore))


def _block_fp8(q: dict) -> QuantScheme:
    _want(q, "fmt", ("e4m3",), KEY, required=False)
    _want(q, "activation_scheme", ("dynamic",), KEY)
    b = q.get("weight_block_size")
    if (not isinstance(b, list) or len(b) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0
                                                           for i in b)):
        raise ConfigError(f"{KEY}.weight_block_size", f"must be [block_n, block_k] positive integers "
                                                      f"(per-channel fp8 checkpoints use compressed-tensors), got {b!r}")
    if b[1] % 16:
        raise ConfigError(f"{KEY}.weight_block_size", f"the block width must be a multiple of 16, got {b}")
    ignore = q.get("ignored_layers") or q.get("modules_to_not_convert") or []
    return QuantScheme("fp8", (b[0], b[1]), tuple(ignore))


def parse_quantization_config(raw: dict) -> QuantScheme | None:
    """The checkpoint's scheme from config.json (`raw`), None for an unquantized checkpoint."""
    q = raw.get(KEY)
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(KEY, f"must be an object, got {q!r}")
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method == "fp8":
        return _block_fp8(q)
    raise ConfigError(f"{KEY}.quant_method", f"unsupported quantization method {method!r}; supported: "
                                             f"'compressed-tensors' (FP8 float-quantized) and 'fp8' (block-wise)")


def resolve_scheme(raw: dict, quantization: str | None) -> QuantScheme | None:
    """The scheme to load with: the checkpoint's own, else `quantization="fp8"` (quantize on load), else None."""
    if quantization is not None and (not isinstance(quantization, str)
                                     or quantization.lower() not in ("none", "fp8")):
        raise ConfigError("quantization", f"supported: 'fp8' (or none), got {quantization!r}")
    scheme = parse_quantization_config(raw)
    if scheme is not None:
        return scheme
    if quantization is not None and quantization.lower() == "fp8":
        return on_load_scheme()
    return None
