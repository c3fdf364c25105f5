"""Kimi Delta Attention ops: reference (naive) forms; Triton kernels live beside them."""

from kimi_linear.ops.kda.naive import kda_gate, naive_chunk_kda, naive_recurrent_kda

__all__ = ["kda_gate", "naive_chunk_kda", "naive_recurrent_kda"]
