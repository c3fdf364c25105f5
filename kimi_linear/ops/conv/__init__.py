"""Causal depthwise short convolution (+ SiLU) with conv state, for prefill and decode."""

from kimi_linear.ops.conv.naive import naive_causal_conv1d

__all__ = ["naive_causal_conv1d"]
