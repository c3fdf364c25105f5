"""Loading FP8: which modules a checkpoint (or `--quantization fp8`) puts in FP8, and the per-tensor rules
the loader (`loader/safetensors.py`) applies through a `QuantLoadPlan`.

- Serialized FP8 checkpoints (`loader/quant_config.py` accepted their `quantization_config`): a module is
  FP8 when its weight tensor is float8_e4m3fn in the checkpoint (its header tells, before anything is
  allocated); everything else stays as the checkpoint has it. A float8 weight needs its scale
  (`weight_scale` [N, 1] (or [N]) per channel or [1] per tensor, stored repeated per channel; `weight_scale_inv`
  [ceil(N / BN), ceil(K / BK)] per block): a missing one is a "missing tensor" error naming it, a scale
  of the wrong shape or dtype, non-finite or not positive, a "malformed scale" error naming it. Modules
  the model keeps in its dtype (`models/quant.KEEP_PLAIN`: kv_b_proj, routers, embedding) are
  dequantized while loading, from the weight and scale pair.
- `--quantization fp8` on a bf16 checkpoint: every projection and expert stack of the decoder is built in
  FP8, and each checkpoint tensor is read onto the device, quantized per output channel and stored: the
  model is never held in bf16 (a tensor at a time is).
- `load_format="dummy"`: the modules `--quantization fp8` would quantize (per the scheme's block layout)
  and random weights drawn as for the bf16 model, then quantized (`models/init.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from kimi_linear.errors import CheckpointError, ConfigError
from kimi_linear.loader.quant_config import QuantScheme, resolve_scheme
from kimi_linear.ops.quant import FP8, dequantize_fp8, quantize_fp8

FP8_TAG = "F8_E4M3"  # the safetensors dtype name of float8_e4m3fn


def checkpoint_dtypes(path: str) -> dict[str, str]:
    """Tensor name -> safetensors dtype tag ("BF16", "F8_E4M3", ...), from the shard headers alone."""
    from kimi_linear.loader.safetensors import _safe_open, checkpoint_shards

    out = {}
    for shard, names in checkpoint_shards(path).items():
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            continue  # load_weights names the missing shard
        with _safe_open(file) as f:
            keys = set(f.keys())
            for n in names:
                if n in keys:
                    out[n] = f.get_slice(n).get_dtype()
    return out


def fp8_nan_count(t: torch.Tensor) -> int:
    """NaN values of a float8_e4m3fn tensor (e4m3fn has no inf: S.1111.111 is NaN)."""
    return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())


@dataclass
class QuantLoadPlan:
    """What `from_pretrained` builds in FP8 and how `load_weights` treats each tensor (module docstring)."""
    scheme: QuantScheme
    fp8_modules: list[str]
    dequantize: set[str] = field(default_factory=set)  # KEEP_PLAIN weights that are float8 in the checkpoint
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def block(self) -> tuple[int, int] | None:
        return self.scheme.block

    def _scale_names(self, weight: str) -> tuple[str, ...]:
        base = weight[: -len("weight")]
        return (base + "weight_scale", base + "weight_scale_inv")

    # ---------------------------------------------------------------- the loader's hooks
    def expected_names(self, layout: dict) -> set[str]:
        """Checkpoint names that must be present: on load, the scales are computed, not read."""
        if self.scheme.serialized:
            return set(layout)
        return {n for n in layout if not n.endswith(("weight_scale", "weight_scale_inv"))}

    def consumes(self, name: str) -> bool:
        """Whether `name` is half of a weight + scale pair dequantized while loading (kept-plain modules)."""
        if name in self.dequantize:
            return True
        return any(name in self._scale_names(w) for w in self.dequantize)

    def take(self, name: str, t: torch.Tensor, params: dict, layout: dict, file: str) -> str | None:
        """Keep one half of a dequantized pair; with both halves, store the dequantized weight. Returns the
        layout name completed, if any."""
        weight = name if name in self.dequantize else next(w for w in self.dequantize if name in self._scale_names(w))
        parts = self.pending.setdefault(weight, {})
        parts["weight" if name == weight else name] = t
        scales = [k for k in parts if k != "weight"]
        if "weight" not in parts or not scales:
            return None
        q, s = parts["weight"], parts[scales[0]]
        block = self.scheme.block if scales[0].endswith("_inv") else None
        pname, index, shape = layout[weight]
        s = self.check_scale(scales[0], s, q.shape, block, file)
        dst = params[pname].data
        (dst[index] if index is not None else dst).copy_(dequantize_fp8(q, s, block, dst.dtype))
        del self.pending[weight]
        return weight

    def accepts_shape(self, name: str, got: tuple, shape: tuple) -> bool:
        """A per-tensor compressed-tensors scale ([] or [1]) where the model stores one per channel."""
        return (name.endswith("weight_scale") and len(shape) == 2 and shape[1] == 1
                and got in ((), (1,), (shape[0],)))

    def convert(self, name: str, t: torch.Tensor, dst: torch.Tensor, index, shape: tuple, params: dict,
                pname: str, file: str) -> tuple[torch.Tensor | None, str | None]:
        """(tensor to copy into dst[index], or None when stored here; an extra layout name now filled)."""
        if name.endswith(("weight_scale", "weight_scale_inv")):
            block = self.scheme.block if name.endswith("_inv") else None
            return self.check_scale(name, t, None, block, file, expected=shape), None
        if dst.dtype == FP8:
            if t.dtype == FP8:
                if not self.scheme.serialized:
                    raise CheckpointError(f"tensor {name} in {file} is already float8 but the checkpoint has no "
                                          f"quantization_config", tensor=name, file=file)
                bad = fp8_nan_count(t)
                if bad:
                    raise CheckpointError(f"tensor {name} in {file} has {bad} NaN values of {t.numel()}",
                                          tensor=name, file=file)
                return t, None
            if self.scheme.serialized:
                raise CheckpointError(f"tensor {name} in {file} is {t.dtype}, but its layer's other weights are "
                                      f"float8_e4m3fn: a checkpoint quantizes a module whole", tensor=name, file=file)
            from kimi_linear.loader.safetensors import check_finite

            check_finite(t, name, file)
            q, s = quantize_fp8(t, None)  # on load: per output channel, on the read device
            (dst[index] if index is not None else dst).copy_(q)
            sp = params[pname + "_scale"].data
            (sp[index] if index is not None else sp).copy_(s)
            return None, name + "_scale"
        if t.dtype == FP8:
            raise CheckpointError(f"tensor {name} in {file} is float8_e4m3fn, but the model keeps {pname} in "
                                  f"{dst.dtype} and the checkpoint gives no scale for it", tensor=name, file=file)
        from kimi_linear.loader.safetensors import check_finite

        check_finite(t, name, file)
        return t, None

    def check_scale(self, name: str, s: torch.Tensor, wshape, block, file: str, expected: tuple | None = None):
        """A scale tensor as fp32, or a CheckpointError naming it ("malformed scale")."""
        if not s.is_floating_point() or s.dtype == FP8:
            raise CheckpointError(f"malformed scale {name} in {file}: dtype {s.dtype}, expected float32 "
                                  f"(or bfloat16 / float16)", tensor=name, file=file)
        if expected is None:  # a dequantized pair: the shape follows from the weight's
            N, K = wshape
            expected = (N, 1) if block is None else (-(-N // block[0]), -(-K // block[1]))
        s = s.float()
        if len(expected) == 2 and expected[1] == 1 and block is None:
            if tuple(s.shape) in ((), (1,)):  # per tensor
                s = s.reshape(1, 1).expand(expected[0], 1)
            elif tuple(s.shape) == (expected[0],):  # per channel, stored 1-D
                s = s.reshape(expected[0], 1)
        if tuple(s.shape) != tuple(expected):
            raise CheckpointError(f"malformed scale {name} in {file}: shape {list(s.shape)}, expected "
                                  f"{list(expected)}", tensor=name, file=file)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            bad = int((~(torch.isfinite(s) & (s > 0))).sum())
            raise CheckpointError(f"malformed scale {name} in {file}: {bad} values are not finite positive numbers",
                                  tensor=name, file=file)
        return s

    def finish(self) -> None:
        if self.pending:
            weight, parts = next(iter(self.pending.items()))
            missing = weight if "weight" not in parts else " or ".join(self._scale_names(weight))
            raise CheckpointError(f"missing tensor {missing}: {weight} is float8 and needs its weight and scale",
                                  tensor=weight)


def plan_quantized_load(cls, config, path: str, quantization: str | None,
                        read_checkpoint: bool = True) -> QuantLoadPlan | None:
    """The FP8 plan for loading `path` with model class `cls` (None: nothing is FP8)."""
    from kimi_linear.models.quant import KEEP_PLAIN, fp8_capable

    scheme = resolve_scheme(config.raw, quantization)
    if scheme is None:
        return None
    if scheme.block is not None:
        bn = scheme.block[0]
        if config.num_experts and (config.moe_intermediate_size % bn or config.hidden_size % bn):
            raise ConfigError("quantization_config.weight_block_size",
                              f"the block height {bn} must divide moe_intermediate_size "
                              f"({config.moe_intermediate_size}) and hidden_size ({config.hidden_size})")
    with torch.device("meta"):
        probe = cls(config)
    capable = fp8_capable(probe)
    if not scheme.serialized or not read_checkpoint:
        return QuantLoadPlan(scheme, [n for n in capable if n.startswith("model.layers.")])
    dtypes = checkpoint_dtypes(os.fspath(path))
    canon = {cls.canonical_tensor_name(n, config): d for n, d in dtypes.items()}
    names = []
    for name, m in capable.items():
        key = f"{name}.0.w1.weight" if hasattr(m, "w13_weight") else f"{name}.weight"
        if canon.get(key) == FP8_TAG:
            names.append(name)
    dequant = {n for n, d in canon.items() if d == FP8_TAG and KEEP_PLAIN.search(n[: -len(".weight")])
               and n.endswith(".weight")}
    return QuantLoadPlan(scheme, names, dequant)
