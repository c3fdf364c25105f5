"""Reference MoE routing and experts (spec section 6).

Router: logits in fp32, scores = sigmoid(logits); experts are *selected* on scores + bias through
grouped top-k (groups ranked by the sum of their two best biased scores, `topk_group` groups kept),
and *weighted* by the unbiased scores (transformers 5.x / vLLM / SGLang), or by the biased ones when
`biased_weights` (the original remote code aliases scores and choice through an in-place add; see
spec section 6.2). Then optional renormalisation and the scaling factor.

Experts: stacked weights w13 [E, 2I, D] (rows [gate (w1); up (w3)]) and w2 [E, D, I];
y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_grouped_topk(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                         num_expert_group: int = 1, topk_group: int = 1, renormalize: bool = True,
                         scaling: float = 1.0, biased_weights: bool = False):
    """x [N, D] -> (topk_weights [N, k] fp32, topk_ids [N, k] int64)."""
    logits = x.float() @ gate_weight.float().t()
    scores = torch.sigmoid(logits)
    choice = scores + bias.float() if bias is not None else scores
    N, E = choice.shape
    if num_expert_group > 1:
        grouped = choice.view(N, num_expert_group, E // num_expert_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // num_expert_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = (choice if biased_weights else scores).gather(1, ids)
    if renormalize:  # transformers renormalises even at top_k = 1 (the remote code skips it there)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def naive_moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """Loop over the experts that were hit. Each expert runs in x's dtype; the weighted sum in fp32."""
    N, D = x.shape
    I = w2.shape[-1]
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        h = x[tok] @ w13[e].t()
        h = F.silu(h[:, :I]) * h[:, I:]
        y = h @ w2[e].t()
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
