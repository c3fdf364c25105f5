"""TrainConfig: every option of `kimi-linear train` / `python -m kimi_linear.train`, and its flags.

One dataclass field per flag (`--` + the field name with `-`), its default and help in the field only;
`add_train_args(parser)` generates the flags and `TrainConfig.from_args(ns)` maps them back 1:1.
`validate(world_size)` checks everything that can be checked before loading anything and raises
`TrainConfigError` naming the flag; the derived values (rows per rank per step, the min-lr and warm-up
defaults, the compute device and dtype) are methods, so their defaults also live here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from kimi_linear.errors import TrainConfigError

SCHEDULES = ("wsd", "cosine", "constant")
OPTIMIZERS = ("adamw", "muon")
DTYPES = ("auto", "bfloat16", "float32")


def _opt(help: str, **meta) -> dict:
    return {"help": help, **meta}


@dataclass
class TrainConfig:
    """Options of one training run (see each field's help)."""

    # ------------------------------------------------------------ model and data
    model: str | None = field(default=None, metadata=_opt("HF checkpoint folder to fine-tune", metavar="DIR"))
    preset: str | None = field(default=None, metadata=_opt("train from scratch: a preset shape (tiny, small, ...)",
                                                           metavar="NAME"))
    tokenizer: str | None = field(default=None, metadata=_opt(
        "folder with the tokenizer files (default: --model's; for --preset one is built, vocabularies <= 4352)",
        metavar="DIR"))
    data: str | None = field(default=None, metadata=_opt(
        'training data: JSON lines, {"text": ...} (pre-training) or {"messages": [...]} (chat SFT)',
        metavar="FILE.jsonl"))
    eval_data: str | None = field(default=None, metadata=_opt("held-out JSON lines: eval loss (no grad)",
                                                              metavar="FILE.jsonl"))
    eval_every: int = field(default=0, metadata=_opt("evaluate every N steps (0: only after the last step)"))
    seq_len: int = field(default=2048, metadata=_opt("tokens per packed row"))
    batch_tokens: int | None = field(default=None, metadata=_opt(
        "global tokens per optimizer step, a multiple of seq-len x processes (default: one row per process)"))
    steps: int = field(default=1000, metadata=_opt("optimizer steps"))
    # ------------------------------------------------------------ optimisation
    lr: float = field(default=3e-4, metadata=_opt("peak learning rate"))
    min_lr: float | None = field(default=None, metadata=_opt("final learning rate (default: lr / 10)"))
    warmup_steps: int | None = field(default=None, metadata=_opt("linear warm-up steps (default: 5%% of --steps)"))
    schedule: str = field(default="wsd", metadata=_opt("learning-rate schedule after warm-up: warmup-stable-decay, "
                                                       "cosine or constant", choices=SCHEDULES))
    decay_frac: float = field(default=0.2, metadata=_opt("wsd: fraction of the steps spent decaying to --min-lr"))
    optimizer: str = field(default="adamw", metadata=_opt(
        "adamw, or muon (Newton-Schulz orthogonalised momentum for the decoder's matrices, AdamW for the rest)",
        choices=OPTIMIZERS))
    weight_decay: float = field(default=0.1, metadata=_opt("decoupled weight decay of matrices and embeddings"))
    beta1: float = field(default=0.9, metadata=_opt("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_opt("AdamW beta2"))
    muon_momentum: float = field(default=0.95, metadata=_opt("Muon's (Nesterov) momentum"))
    grad_clip: float = field(default=1.0, metadata=_opt("clip the global gradient norm (0: off)"))
    grad_checkpointing: bool = field(default=False, metadata=_opt("recompute each decoder layer in backward"))
    grad_checkpointing_every: int = field(default=1, metadata=_opt(
        "with --grad-checkpointing, recompute only every Nth decoder layer (layers 0, N, 2N, ...): less memory "
        "saved for less recompute (torchtitan's selective layer checkpointing)"))
    moe_bias_update_rate: float = field(default=1e-3, metadata=_opt(
        "aux-loss-free balance: step of the router's e_score_correction_bias per optimizer step (0: off; LoRA "
        "runs leave the base model, biases included, unchanged)"))
    aux_loss_coef: float = field(default=0.0, metadata=_opt("coefficient of the sequence-level MoE aux loss"))
    seed: int = field(default=0, metadata=_opt("seed of weights (for --preset), data order and RNG"))
    # ------------------------------------------------------------ LoRA
    lora_rank: int = field(default=0, metadata=_opt("LoRA rank (0: full fine-tuning)"))
    lora_alpha: float = field(default=16.0, metadata=_opt("LoRA alpha (scale alpha / rank)"))
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata=_opt(
        "comma-separated projection names that get adapters"))
    merge_lora: bool = field(default=False, metadata=_opt("also export the merged full weights at the end"))
    # ------------------------------------------------------------ output
    out: str | None = field(default=None, metadata=_opt("output folder (metrics, checkpoints, exports)",
                                                        metavar="DIR"))
    save_every: int = field(default=0, metadata=_opt("DCP checkpoint + HF export every N steps (0: only the end)"))
    resume: str | None = field(default=None, metadata=_opt(
        "continue from a checkpoint folder (OUT/checkpoints/step-N, or OUT for the latest)", metavar="DIR"))
    log_every: int = field(default=1, metadata=_opt("write a metrics.jsonl line every N steps"))
    device: str = field(default="auto", metadata=_opt("cpu, cuda (auto: cuda when available)"))
    dtype: str = field(default="auto", metadata=_opt(
        "compute dtype (bfloat16 autocast over fp32 master weights, or float32; auto: bf16 on CUDA, fp32 on CPU); "
        "given explicitly, also the export dtype (default: the checkpoint's)", choices=DTYPES))
    plot: str | None = field(default=None, metadata=_opt(
        "draw OUT/metrics.jsonl's loss and throughput curves to OUT/metrics.png and exit", metavar="OUT"))

    # ---------------------------------------------------------------- flags
    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TrainConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    # ---------------------------------------------------------------- derived values
    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def resolved_warmup(self) -> int:
        return max(self.steps // 20, 0) if self.warmup_steps is None else self.warmup_steps

    def rows_per_rank(self, world_size: int) -> int:
        """Packed rows each process runs per optimizer step (--batch-tokens / (seq-len x processes))."""
        if self.batch_tokens is None:
            return 1
        per_row = self.seq_len * world_size
        if self.batch_tokens % per_row:
            raise TrainConfigError("--batch-tokens", f"{self.batch_tokens} is not a multiple of --seq-len x processes "
                                                     f"= {self.seq_len} x {world_size} = {per_row}")
        return self.batch_tokens // per_row

    def global_batch_tokens(self, world_size: int) -> int:
        return self.rows_per_rank(world_size) * world_size * self.seq_len

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: int = 1) -> None:
        """Raise TrainConfigError (naming the flag) for anything wrong that needs no model or data."""
        if self.plot is not None:
            if not os.path.isfile(os.path.join(self.plot, "metrics.jsonl")):
                raise TrainConfigError("--plot", f"no metrics.jsonl in {self.plot}")
            return
        if (self.model is None) == (self.preset is None):
            raise TrainConfigError("--model/--preset", "give exactly one: --model DIR (fine-tune a checkpoint) or "
                                                       "--preset NAME (train from scratch)")
        if self.model is not None and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise TrainConfigError("--model", f"{self.model} is not a checkpoint folder (no config.json)")
        if self.preset is not None:
            from kimi_linear.tools.presets import PRESETS

            if self.preset not in PRESETS:
                raise TrainConfigError("--preset", f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise TrainConfigError("--tokenizer", f"{self.tokenizer} is not a folder")
        if self.data is None:
            raise TrainConfigError("--data", "a training file is required (JSON lines)")
        for flag, path in (("--data", self.data), ("--eval-data", self.eval_data)):
            if path is not None and not os.path.isfile(path):
                raise TrainConfigError(flag, f"no such file: {path}")
        if self.out is None:
            raise TrainConfigError("--out", "an output folder is required")
        if self.resume is not None and not os.path.isdir(self.resume):
            raise TrainConfigError("--resume", f"no such folder: {self.resume}")
        for flag, value in (("--seq-len", self.seq_len), ("--steps", self.steps), ("--log-every", self.log_every)):
            if value < 1:
                raise TrainConfigError(flag, f"must be at least 1, got {value}")
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every),
                            ("--lora-rank", self.lora_rank), ("--weight-decay", self.weight_decay),
                            ("--grad-clip", self.grad_clip), ("--moe-bias-update-rate", self.moe_bias_update_rate),
                            ("--aux-loss-coef", self.aux_loss_coef)):
            if value < 0:
                raise TrainConfigError(flag, f"must not be negative, got {value}")
        if self.grad_checkpointing_every < 1:
            raise TrainConfigError("--grad-checkpointing-every", f"must be at least 1, got {self.grad_checkpointing_every}")
        if self.grad_checkpointing_every > 1 and not self.grad_checkpointing:
            raise TrainConfigError("--grad-checkpointing-every", "needs --grad-checkpointing")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise TrainConfigError("--batch-tokens", f"must be positive, got {self.batch_tokens}")
        self.rows_per_rank(world_size)
        if not self.lr > 0:
            raise TrainConfigError("--lr", f"must be positive, got {self.lr}")
        if not 0 <= self.resolved_min_lr() <= self.lr:
            raise TrainConfigError("--min-lr", f"must lie in [0, --lr = {self.lr}], got {self.resolved_min_lr()}")
        if not 0 <= self.resolved_warmup() <= self.steps:
            raise TrainConfigError("--warmup-steps", f"must lie in [0, --steps = {self.steps}], got {self.warmup_steps}")
        if not 0 <= self.decay_frac <= 1:
            raise TrainConfigError("--decay-frac", f"must lie in [0, 1], got {self.decay_frac}")
        for flag, value in (("--beta1", self.beta1), ("--beta2", self.beta2), ("--muon-momentum", self.muon_momentum)):
            if not 0 <= value < 1:
                raise TrainConfigError(flag, f"must lie in [0, 1), got {value}")
        if self.lora_rank:
            if self.model is None:
                raise TrainConfigError("--lora-rank", "LoRA fine-tunes a checkpoint: give --model DIR")
            if not self.lora_target_list():
                raise TrainConfigError("--lora-targets", "names no projection")
            if not self.lora_alpha > 0:
                raise TrainConfigError("--lora-alpha", f"must be positive, got {self.lora_alpha}")
        elif self.merge_lora:
            raise TrainConfigError("--merge-lora", "needs a LoRA run (--lora-rank R)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise TrainConfigError("--device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


# -------------------------------------------------------------------- the parser
def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(f: dataclasses.Field):
    base = str(f.type).replace(" ", "").replace("|None", "")
    return {"int": int, "float": float}.get(base, str)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default and help from the field."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        help_text = meta["help"]
        if f.default not in (None, False) and "default" not in help_text:
            help_text += f" (default: {f.default})"
        kw = dict(dest=f.name, default=f.default, help=help_text)
        if str(f.type) == "bool":
            p.add_argument(flag_of(f.name), action="store_true", **kw)
        else:
            typ = _flag_type(f)
            metavar = meta.get("metavar") or {int: "N", float: "X"}.get(typ)
            p.add_argument(flag_of(f.name), type=typ, choices=meta.get("choices"), metavar=metavar, **kw)


DESCRIPTION = ("Pre-train from a preset (--preset) or fine-tune a checkpoint (--model), full or LoRA, on packed "
               "JSON-lines data; one process, or many under torchrun (FSDP2). Writes OUT/metrics.jsonl, DCP "
               "checkpoints and an HF folder that serve / LLM / transformers load.")
