"""Auxiliary-loss-free MoE load balancing (DeepSeek-V3 / Kimi) and the per-expert load metric.

Each MoE module exposes `tokens_per_expert` (fp32 [E], the routed-token counts of its latest training
forward) and the router's `gate.e_score_correction_bias` [E] (added to the scores for top-k selection
only, not to the mixing weights). `ExpertLoad` sums the counts over a step's rows; after the optimizer
step `update_bias` all-reduces them over the data-parallel ranks and moves every bias by
`rate * sign(mean load - load)`: overloaded experts become less attractive, underloaded ones more.
The update runs under no_grad, outside the optimizer (the bias is no trainable parameter), identically
on every rank. The imbalance of a layer is max load / mean load (1.0 = perfectly balanced).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def moe_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every MoE block: the modules with a router carrying `e_score_correction_bias`."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "gate") and hasattr(m.gate, "e_score_correction_bias")]


class ExpertLoad:
    """Routed-token counts per MoE layer, summed over the rows of one optimizer step."""

    def __init__(self, model: torch.nn.Module):
        self.modules = moe_modules(model)
        self.counts: list[torch.Tensor | None] = [None] * len(self.modules)

    def accumulate(self) -> None:
        """Add each MoE module's `tokens_per_expert` of the forward just run."""
        for i, (name, m) in enumerate(self.modules):
            t = getattr(m, "tokens_per_expert", None)
            if t is None:
                raise RuntimeError(f"{name} exposes no tokens_per_expert after a training forward")
            t = t.detach().float()
            self.counts[i] = t.clone() if self.counts[i] is None else self.counts[i] + t

    def reduce(self) -> list[torch.Tensor]:
        """The step's counts summed over every rank (fp32 [E] per layer); resets the accumulator."""
        counts = [c for c in self.counts if c is not None]
        self.counts = [None] * len(self.modules)
        if not counts:
            return []
        flat = torch.stack(counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        return list(flat.unbind(0))

    @torch.no_grad()
    def update_bias(self, counts: list[torch.Tensor], rate: float) -> None:
        """e_score_correction_bias += rate * sign(mean - load), per layer."""
        if rate == 0:
            return
        for (_, m), load in zip(self.modules, counts):
            bias = m.gate.e_score_correction_bias
            delta = (rate * torch.sign(load.mean() - load)).to(bias.dtype)
            if isinstance(bias, DTensor):
                delta = distribute_tensor(delta.to(bias.device), bias.device_mesh, bias.placements, src_data_rank=None)
            bias.add_(delta.to(bias.device))


def imbalance(counts: list[torch.Tensor]) -> list[float]:
    """max load / mean load of each layer (1.0 = balanced; 0 tokens counts as balanced)."""
    out = []
    for c in counts:
        mean = c.float().mean().item()
        out.append(c.max().item() / mean if mean > 0 else 1.0)
    return out
