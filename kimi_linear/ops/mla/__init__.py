"""Multi-head latent attention (NoPE): MHA form for prefill, absorbed MQA form over the latent cache."""

from kimi_linear.ops.mla.naive import (
    gather_latent,
    mla_attention_absorbed,
    mla_attention_mha,
    write_latent,
)

__all__ = ["mla_attention_mha", "mla_attention_absorbed", "gather_latent", "write_latent"]
