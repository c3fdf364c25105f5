"""Reference MoE routing and experts (spec section 6).

Router: logits in fp32, scores = sigmoid(logits); experts are *selected* on scores + bias through
grouped top-k (groups ranked by the sum of their two best biased scores, `topk_group` groups kept),
and *weighted* by the unbiased scores (transformers 5.x / vLLM / SGLang), or by the biased ones when
`biased_weights` (the original remote code aliases scores and choice through an in-place add; see
spec section 6.2). Then optional renormalisation and the scaling factor.

Experts: stacked weights w13 [E, 2I, D] (rows [gate (w1); up (w3)]) and w2 [E, D, I];
y = sum_k w_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x).

Shared experts folded into the stacks (`num_shared` = S: the last S experts, in the last S columns of the
routing with weight 1.0, as the fused router appends them): the naive forms keep the reference order, the
routed sum rounded to x's dtype, then each shared expert's output added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.moe.logits import fp32_logits


def router_scores(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """sigmoid(x @ gate_weight^T) [N, E] in fp32, also under autocast (the router's logits stay fp32;
    `logits.fp32_logits` keeps x in its own dtype for the backward)."""
    return torch.sigmoid(fp32_logits(x, gate_weight))


def sigmoid_grouped_topk(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                         num_expert_group: int = 1, topk_group: int = 1, renormalize: bool = True,
                         scaling: float = 1.0, biased_weights: bool = False, num_shared: int = 0):
    """x [N, D] -> (topk_weights [N, k + S] fp32, topk_ids [N, k + S] int64); num_shared = S > 0 appends S
    shared-expert slots (ids E .. E + S - 1, weight 1.0)."""
    scores = router_scores(x, gate_weight)
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
    weights = weights * scaling
    if num_shared:
        shared_ids = torch.arange(E, E + num_shared, device=ids.device).expand(N, num_shared)
        ids = torch.cat([ids, shared_ids], dim=1)
        weights = torch.cat([weights, weights.new_ones(N, num_shared)], dim=1)
    return weights, ids


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


def naive_fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, num_shared: int = 0, routed: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts (`naive_moe_experts`, or their sum `routed` [N, D] computed elsewhere), then the
    last `num_shared` experts of the stacks as shared experts (every token, weight 1), each added to the
    rounded routed sum as the reference model does."""
    k = topk_ids.shape[1] - num_shared
    y = naive_moe_experts(x, w13, w2, topk_weights[:, :k], topk_ids[:, :k]) if routed is None else routed
    E = w13.shape[0] - num_shared
    for s in range(E, E + num_shared):
        gate, up = F.linear(x, w13[s]).chunk(2, dim=-1)
        y = y + F.linear(F.silu(gate) * up, w2[s])
    return y
