"""What the model's training call returns (`model(input_ids, cu_seqlens=..., labels=...)`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainOutput:
    """One packed row's loss terms, unnormalised so that callers can average over rows, ranks and steps.

    loss_sum: fp32 scalar, the sum of the token cross-entropies over the labels that are not -100.
    num_tokens: int64 scalar, the number of such labels (no gradient).
    aux_loss: fp32 scalar, the sequence-level MoE balance loss already times its coefficient
        (`set_moe_aux_loss_coef`), summed over the MoE layers; 0 when the coefficient is 0.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    aux_loss: torch.Tensor
