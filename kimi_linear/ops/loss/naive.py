"""Reference linear + cross-entropy: the full [tokens, vocab] logits in fp32, then torch's cross-entropy.

The oracle of `chunked.py` (which never materialises the logits whole). Returns the *sum* of the token
losses over the targets that are not `ignore_index` and the number of such targets, so that callers can
normalise over any number of rows, ranks and accumulation steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], labels int [N] -> (loss_sum fp32 scalar, num_tokens int64 scalar)."""
    logits = (hidden @ weight.t()).float()
    loss_sum = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    return loss_sum, (labels != ignore_index).sum()
