"""Kimi Delta Attention ops: reference (naive) forms and the Triton kernels (imported lazily, so that
importing the package never needs triton)."""

from kimi_linear.ops.kda.naive import kda_gate, naive_chunk_kda, naive_recurrent_kda

__all__ = ["kda_gate", "naive_chunk_kda", "naive_recurrent_kda", "chunk_kda", "fused_recurrent_kda"]


def __getattr__(name):
    if name == "chunk_kda":
        from kimi_linear.ops.kda.chunk import chunk_kda

        return chunk_kda
    if name == "fused_recurrent_kda":
        from kimi_linear.ops.kda.fused_recurrent import fused_recurrent_kda

        return fused_recurrent_kda
    raise AttributeError(name)
