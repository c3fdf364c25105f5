"""LoRA adapters on a model's nn.Linear weights, saved and loaded in the PEFT layout, and merged.

- `apply_lora(model, rank, alpha, targets)`: each nn.Linear whose module path is a target or ends with
  "." + a target (PEFT's `target_modules` rule: "q_proj" names every attention q_proj) gets a
  `torch.nn.utils.parametrize` parametrization of its `weight`: W -> W + (B @ A) * alpha / rank, with
  A [rank, in] (Kaiming-uniform, as PEFT) and B [out, rank] zero, so the model is unchanged at the start.
  Every other parameter is frozen (requires_grad False). Because `.weight` itself is parametrized,
  every way a layer reads it (F.linear, the MLA ops reading `kv_b_proj.weight`, the inference fused-row
  groups of `layers/fused.py`, which gather `.weight`s) sees the adapted weight. A and B are fp32
  (master weights); the delta is cast to W's dtype, so a bf16 base stays bf16.
- The fused-row groups: under autograd they are skipped (the separate projections run). Without
  autograd `fused_weight` receives the freshly computed adapted weights, finds them untied and ties
  (concatenates) them again on every forward: correct values, but one weight copy per group per call,
  and it re-points the group's untargeted parameters at the new storage. Evaluation of a LoRA model is
  therefore right but not fast; `merge_lora` before serving removes the cost. The fix belongs to
  `layers/fused.py`: `fused_weight` (and `tie_all`) should return None / skip a group when one of its
  tensors is not an nn.Parameter (a parametrized weight, computed on access), so the separate projections
  run and nothing is re-tied.
- `save_lora_adapter(model, out_dir, base_model_path)`: `adapter_config.json` (PEFT's LoraConfig:
  peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, base_model_name_or_path, bias none)
  and `adapter_model.safetensors` with PEFT's names `base_model.model.<module path>.lora_A.weight` /
  `.lora_B.weight`. Module paths are the checkpoint's (`self_attn.f_a_proj`, `block_sparse_moe.
  shared_experts.gate_proj`), as the official checkpoint, vLLM and transformers' conversion mapping use;
  `load_lora_adapter` also accepts transformers' in-memory names (`self_attn.forget_gate.f_a_proj`,
  `mlp.shared_experts.*`), i.e. an adapter saved by PEFT on transformers' KimiLinearForCausalLM.
- `merge_lora(model)`: W += (B @ A) * scale in place (a tied fused group stays tied), the
  parametrizations removed, the requires_grad flags from before `apply_lora` restored.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from kimi_linear.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAParametrization(nn.Module):
    """W -> W + (lora_B @ lora_A) * scaling, the delta cast to W's dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 device: torch.device | str | None = None):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def delta(self) -> torch.Tensor:
        """(B @ A) * scaling [out, in], fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


@dataclass
class LoRASpec:
    """What `apply_lora` did to a model (kept on it as `model.lora_spec`)."""

    rank: int
    alpha: float
    targets: list[str]
    modules: list[str]                                          # paths of the adapted nn.Linear modules
    requires_grad: dict[str, bool] = field(default_factory=dict)  # parameter flags before apply_lora


# --------------------------------------------------------------------------- apply
def _clean(path: str) -> str:
    """A module path without wrapper segments (torch.compile's `_orig_mod`)."""
    return ".".join(p for p in path.split(".") if p != "_orig_mod")


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Module path -> nn.Linear, for every Linear in the model (adapted or not)."""
    return {_clean(name): m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _lora(module: nn.Module) -> LoRAParametrization | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, LoRAParametrization):
            return p
    return None


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...]) -> LoRASpec:
    """Add LoRA adapters to every targeted nn.Linear and freeze everything else. Returns the spec (also
    `model.lora_spec`). Raises ConfigError(key="lora_targets" / "lora_rank" / "lora_alpha")."""
    if getattr(model, "lora_spec", None) is not None:
        raise ConfigError("lora_targets", "the model already has LoRA adapters (merge_lora removes them)")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError("lora_rank", f"must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError("lora_alpha", f"must be a positive number, got {alpha!r}")
    targets = [t.strip() for t in targets if t.strip()] if not isinstance(targets, str) else [targets]
    if not targets:
        raise ConfigError("lora_targets", "no target modules given")
    linears = linear_modules(model)
    valid = sorted({path.rsplit(".", 1)[-1] for path in linears})
    chosen: dict[str, nn.Linear] = {}
    for t in targets:
        hits = {p: m for p, m in linears.items() if _matches(p, t)}
        if not hits:
            raise ConfigError("lora_targets",
                              f"{t!r} names no nn.Linear of the model; valid targets: {', '.join(valid)}")
        chosen.update(hits)
    shared = _shared_weights(model)
    for path, m in chosen.items():
        if id(m.weight) in shared:
            raise ConfigError("lora_targets", f"{path}.weight is shared with another module (tied embeddings); "
                                              f"LoRA cannot target it")
    spec = LoRASpec(rank, float(alpha), targets, sorted(chosen),
                    {_clean(n): p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for path in spec.modules:
        m = chosen[path]
        lora = LoRAParametrization(m.in_features, m.out_features, rank, float(alpha), device=m.weight.device)
        parametrize.register_parametrization(m, "weight", lora)
        # parametrize keeps the original Parameter (frozen above) under parametrizations.weight.original
    model.lora_spec = spec
    return spec


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A then B of each adapted module, in module order): what the optimizer trains."""
    out = []
    for path, m in linear_modules(model).items():
        lora = _lora(m)
        if lora is not None:
            out += [lora.lora_A, lora.lora_B]
    return out


def _adapted(model: nn.Module) -> dict[str, LoRAParametrization]:
    return {path: lora for path, m in linear_modules(model).items() if (lora := _lora(m)) is not None}


# --------------------------------------------------------------------------- save / load
def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `t` (an FSDP2 DTensor is gathered: a collective, so every rank must call)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors: `base_model.model.<path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]."""
    out = {}
    for path, lora in _adapted(model).items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = _full(lora.lora_A)
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = _full(lora.lora_B)
    return out


def adapter_config(spec: LoRASpec, base_model_path: str | os.PathLike | None) -> dict:
    """The adapter_config.json dict (PEFT LoraConfig fields; the defaults written out so readers need none)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "target_modules": list(spec.targets),
        "base_model_name_or_path": os.fspath(base_model_path) if base_model_path else None,
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_lora_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_path: str | os.PathLike | None,
                      write: bool = True) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` to out_dir. Under FSDP2 every rank calls
    it (the adapters are gathered) and only the rank with `write=True` writes."""
    from safetensors.torch import save_file

    spec = getattr(model, "lora_spec", None)
    if spec is None:
        raise ConfigError("lora_targets", "the model has no LoRA adapters to save (apply_lora first)")
    tensors = adapter_state_dict(model)
    if not write:
        return
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(spec, base_model_path), f, indent=2)


_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None}


def read_adapter_config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {path}", file=file)
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}", file=file) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: not a JSON object", file=file)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r})", file=file)
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, {}, False):
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (plain LoRA only)", file=file)
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')", file=file)
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{file}: a regex target_modules ({targets!r}) is not supported; list the names",
                              file=file)
    if not isinstance(targets, list) or not isinstance(cfg.get("r"), int) or "lora_alpha" not in cfg:
        raise CheckpointError(f"{file}: needs r, lora_alpha and a target_modules list", file=file)
    return cfg


def _our_path(path: str, ours: dict[str, LoRAParametrization]) -> str:
    """Our module path for an adapter key's path (transformers' in-memory names mapped back)."""
    if path in ours:
        return path
    alt = re.sub(r"\.self_attn\.forget_gate\.(f_[ab]_proj)$", r".self_attn.\1", path)
    alt = re.sub(r"\.mlp\.shared_experts\.", ".block_sparse_moe.shared_experts.", alt)
    return alt


def load_lora_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRASpec:
    """Load a PEFT LoRA adapter folder into `model` (applying LoRA with its config first if the model has
    none). Raises CheckpointError for a missing, unexpected or mis-shaped tensor."""
    from safetensors.torch import load_file

    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        spec = apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
    elif spec.rank != cfg["r"] or spec.alpha != float(cfg["lora_alpha"]):
        raise CheckpointError(f"{adapter_dir}: adapter r={cfg['r']}, lora_alpha={cfg['lora_alpha']} but the model's "
                              f"LoRA has r={spec.rank}, alpha={spec.alpha}")
    file = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}", file=file)
    tensors = load_file(file)
    ours = _adapted(model)
    seen: set[str] = set()
    with torch.no_grad():
        for key, value in tensors.items():
            m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
            if m is None:
                raise CheckpointError(f"{file}: unexpected tensor {key!r} (not a LoRA A/B weight)",
                                      tensor=key, file=file)
            path = _our_path(m.group(1), ours)
            if path not in ours:
                raise CheckpointError(f"{file}: tensor {key!r} targets a module the model's LoRA does not adapt",
                                      tensor=key, file=file)
            param = getattr(ours[path], m.group(2))
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{file}: {key} has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(param.shape)}", tensor=key, file=file)
            param.copy_(value.to(param.dtype))
            seen.add(f"{path}.{m.group(2)}")
    missing = [f"{p}.{ab}" for p in ours for ab in ("lora_A", "lora_B") if f"{p}.{ab}" not in seen]
    if missing:
        raise CheckpointError(f"{file}: missing adapter tensors for {len(missing)} weights, e.g. {missing[0]}",
                              tensor=missing[0], file=file)
    return spec


# --------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += B @ A * scale, in place) and remove the adapters."""
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        raise ConfigError("lora_targets", "the model has no LoRA adapters to merge")
    for path, m in linear_modules(model).items():
        lora = _lora(m)
        if lora is None:
            continue
        original = m.parametrizations.weight.original
        original.add_(lora.delta().to(original.dtype))
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    for name, p in model.named_parameters():
        p.requires_grad_(spec.requires_grad.get(_clean(name), True))
    model.lora_spec = None
