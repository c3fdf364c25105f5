"""Which parameter gets which optimizer and weight decay; `build_optimizer` (called after FSDP2 sharding).

Rules, by checkpoint name and shape (only parameters that require grad):
- Muon (with --optimizer muon): the decoder's weight matrices, i.e. 2-D `model.layers.*` weights (every
  projection, the router's gate.weight) and the stacked routed experts (`experts.w13_weight` as 2E
  matrices w1 | w3, `experts.w2_weight` as E matrices).
- AdamW: everything else: embeddings, lm_head, norms, A_log, dt_bias, short-conv filters, biases (and
  with --optimizer adamw, everything).
- Weight decay: matrices, expert stacks, the embedding and lm_head; none on norms, A_log, dt_bias,
  conv filters, vectors.
"""

from __future__ import annotations

import re

import torch

from kimi_linear.train.muon import Muon

NO_MATRIX = re.compile(r"(\.A_log|\.dt_bias|conv1d\.weight|norm\.weight|\.bias)$")
EXPERT_STACK = re.compile(r"\.experts\.(w13|w2)_weight$")


def is_matrix(name: str, p: torch.Tensor) -> bool:
    """A weight matrix (or a stack of them) rather than a vector, filter or gate parameter."""
    if NO_MATRIX.search(name):
        return False
    return p.dim() == 2 or (p.dim() == 3 and EXPERT_STACK.search(name) is not None)


def uses_muon(name: str, p: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and is_matrix(name, p)


def decays(name: str, p: torch.Tensor) -> bool:
    return is_matrix(name, p)


def muon_split(name: str) -> int:
    """Matrices per row-block of a Muon parameter: the SwiGLU expert stack w13 holds w1 and w3."""
    return 2 if name.endswith("experts.w13_weight") else 1


def param_groups(named_params, optimizer: str, weight_decay: float) -> list[dict]:
    """Param groups for `optimizer` ("adamw" | "muon"), with `names` kept for logs and tests."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        muon = optimizer == "muon" and uses_muon(name, p)
        split = muon_split(name) if muon else 1
        key = (muon, decays(name, p), split)
        g = groups.setdefault(key, {"params": [], "names": [], "use_muon": muon, "split": split,
                                    "weight_decay": weight_decay if key[1] else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW (torch's) or Muon + AdamW over the trainable parameters of `model` (sharded or not)."""
    groups = param_groups(model.named_parameters(), optimizer, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if optimizer == "muon":
        return Muon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps)
    for g in groups:
        g.pop("use_muon"), g.pop("split")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
