"""Linear + cross-entropy for training: the loss of the output projection without the whole logits.

Public entry: `linear_cross_entropy(hidden [N, D], weight [V, D], labels [N], ignore_index=-100,
chunk=None) -> (loss_sum fp32, num_tokens int64)`, the chunked autograd Function of `chunked.py` on
every device (plain torch: no kernel to dispatch to). `naive_linear_cross_entropy` (the full logits)
is the reference.
"""

from __future__ import annotations

from kimi_linear.ops.loss.chunked import chunked_linear_cross_entropy as linear_cross_entropy
from kimi_linear.ops.loss.chunked import default_chunk
from kimi_linear.ops.loss.naive import naive_linear_cross_entropy

__all__ = ["linear_cross_entropy", "naive_linear_cross_entropy", "default_chunk"]
