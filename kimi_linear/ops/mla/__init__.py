"""Multi-head latent attention (NoPE): MHA form for prefill, absorbed MQA form over the latent cache.
The Triton kernels (`mla_decode`, `mla_prefill`) are imported lazily: importing the package never needs triton."""

from kimi_linear.ops.mla.naive import (
    gather_latent,
    mla_attention_absorbed,
    mla_attention_mha,
    write_latent,
)

__all__ = ["mla_attention_mha", "mla_attention_absorbed", "gather_latent", "write_latent", "mla_decode",
           "mla_prefill"]


def __getattr__(name):
    if name == "mla_decode":
        from kimi_linear.ops.mla.decode import mla_decode

        return mla_decode
    if name == "mla_prefill":
        from kimi_linear.ops.mla.prefill import mla_prefill

        return mla_prefill
    raise AttributeError(name)
