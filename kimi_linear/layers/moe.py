"""The MoE block (`block_sparse_moe`): sigmoid router with correction bias, routed SwiGLU experts
stacked into [E, ...] tensors, plus the shared experts.

Parameters: `gate.weight` [E, D], `gate.e_score_correction_bias` [E] (kept fp32),
`experts.w13_weight` [E, 2I, D] (checkpoint `experts.{e}.w1` rows then `w3` rows),
`experts.w2_weight` [E, D, I] (checkpoint `experts.{e}.w2`), `shared_experts.{gate,up,down}_proj`.

Dispatch (`use_triton`): CUDA tensors run the fused Triton router (`ops/moe/routing.py`) and experts
(`ops/moe/fused_moe.py`), which never sync with the host (CUDA-graph capturable); CPU tensors, and any
call that needs autograd (the kernels have no backward), run the naive ops. Inputs are token batches
[..., D], flattened to [N, D].
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.config import ModelConfig
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.ops.moe import naive_moe_experts, sigmoid_grouped_topk
from kimi_linear.ops.triton_utils import use_triton


def _fused(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """The Triton path: on CUDA (see `use_triton`), and only without autograd (the kernels have no backward)."""
    return use_triton(x) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        route = sigmoid_grouped_topk
        if _fused(x, self.weight):
            from kimi_linear.ops.moe.routing import fused_sigmoid_grouped_topk as route
        return route(x, self.weight, self.e_score_correction_bias, c.num_experts_per_token, c.num_expert_group,
                     c.topk_group, c.moe_renormalize, c.routed_scaling_factor, c.moe_biased_weights)


class Experts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2_weight = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if _fused(x, self.w13_weight, self.w2_weight, topk_weights):
            from kimi_linear.ops.moe.fused_moe import fused_moe

            return fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return naive_moe_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_weights, topk_ids = self.gate(x)
        y = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
