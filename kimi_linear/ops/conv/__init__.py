"""Causal depthwise short convolution (+ SiLU) with conv state, for prefill and decode.
The Triton kernel is imported lazily, so that importing the package never needs triton."""

from kimi_linear.ops.conv.naive import naive_causal_conv1d

__all__ = ["naive_causal_conv1d", "causal_conv1d"]


def __getattr__(name):
    if name == "causal_conv1d":
        from kimi_linear.ops.conv.short_conv import causal_conv1d

        return causal_conv1d
    raise AttributeError(name)
