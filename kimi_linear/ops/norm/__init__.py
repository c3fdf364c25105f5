"""Normalisation ops: RMSNorm, gated RMSNorm (KDA output norm), L2 norm; naive forms and Triton kernels
(`fused_rms_norm`, `fused_gated_rms_norm`, imported lazily so that importing the package never needs triton)."""

from kimi_linear.ops.norm.naive import gated_rms_norm, l2norm, rms_norm

__all__ = ["rms_norm", "gated_rms_norm", "l2norm", "fused_rms_norm", "fused_gated_rms_norm"]


def __getattr__(name):
    if name == "fused_rms_norm":
        from kimi_linear.ops.norm.rmsnorm import fused_rms_norm

        return fused_rms_norm
    if name == "fused_gated_rms_norm":
        from kimi_linear.ops.norm.gated_norm import fused_gated_rms_norm

        return fused_gated_rms_norm
    raise AttributeError(name)
