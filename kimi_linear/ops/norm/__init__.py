"""Normalisation ops: RMSNorm, gated RMSNorm (KDA output norm), L2 norm."""

from kimi_linear.ops.norm.naive import gated_rms_norm, l2norm, rms_norm

__all__ = ["rms_norm", "gated_rms_norm", "l2norm"]
