"""Learning-rate schedules: linear warm-up, then warmup-stable-decay, cosine or constant, down to min-lr.

`lr_factor(step, ...)` is the multiplier of the peak lr for optimizer step `step` (0-based: the lr used by
the step-th update); `build_scheduler` wraps it in a LambdaLR, whose state_dict makes resume exact.

- warm-up: step s < W uses lr * (s + 1) / W (the first update already moves, the W-th reaches the peak);
- wsd: the peak until the last `decay_frac` of the steps, then linear to min-lr at the last step;
- cosine: half a cosine from the peak (first step after warm-up) to min-lr (last step);
- constant: the peak.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
              decay_frac: float = 0.2) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    last = total_steps - 1
    if schedule == "cosine":
        span = last - warmup_steps
        progress = 1.0 if span <= 0 else min((step - warmup_steps) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(decay_frac * total_steps)), 0)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        span = last - decay_start
        if step < decay_start or span <= 0:
            return 1.0 if step < decay_start or decay_steps == 0 else min_ratio
        progress = min((step - decay_start) / span, 1.0)
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
                    lr: float, min_lr: float, decay_frac: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every param group (each group's own base lr is scaled by the same factor)."""
    min_ratio = min_lr / lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule, min_ratio, decay_frac))
