"""Memory profiling exercises every [B, V] buffer the sampler can allocate (engine/memory.py)."""

from __future__ import annotations

import dataclasses

import torch

from kimi_linear.engine.memory import profile_sampler
from kimi_linear.engine.sampler import SamplingBatch


def test_profile_sampler_uses_every_per_row_buffer():
    B, V = 6, 300
    batch = profile_sampler(torch.randn(B, V), torch.randn(5, V))
    optional = [f.name for f in dataclasses.fields(SamplingBatch) if f.default is None]
    assert optional, "SamplingBatch has no optional buffers?"
    missing = [name for name in optional if getattr(batch, name) is None]
    assert not missing, f"the profile leaves out sampler buffers {missing}: the cache sizing would underestimate"
    assert batch.use_top_k and batch.use_top_p and batch.num_logprobs == 20 and not batch.all_greedy
    for name in ("prompt_mask", "output_counts", "allowed"):
        assert tuple(getattr(batch, name).shape) == (B, V)
