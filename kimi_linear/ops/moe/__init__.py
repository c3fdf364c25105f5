"""Mixture of experts: sigmoid router with correction bias and grouped top-k; SwiGLU experts."""

from kimi_linear.ops.moe.naive import naive_moe_experts, sigmoid_grouped_topk

__all__ = ["sigmoid_grouped_topk", "naive_moe_experts"]
