"""Prefill, prefill + token-by-token decode, and chunked prefill give the same logits (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear import KimiLinearForCausalLM, SequenceCache


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("T,T1", [(90, 70), (40, 1), (130, 64)])
def test_prefill_then_decode(model, T, T1):
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    full = model(ids)
    cache = SequenceCache(model.config, 2, block_size=16)
    parts = [model(ids[:, :T1], cache)]
    for t in range(T1, T):
        parts.append(model(ids[:, t:t + 1], cache))
    assert_close("prefill+decode", full, torch.cat(parts, 1), 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("piece", [17, 64])
def test_chunked_prefill(model, piece):
    T = 150
    ids = torch.randint(0, model.config.vocab_size, (3, T))
    full = model(ids)
    cache = SequenceCache(model.config, 3, block_size=16, initial_blocks=2)  # forces the cache to grow
    parts = [model(ids[:, s:s + piece], cache) for s in range(0, T, piece)]
    assert_close(f"chunked prefill ({piece})", full, torch.cat(parts, 1), 1e-5)
    assert cache.lengths == [T] * 3


@torch.no_grad()
def test_rows_are_independent(model):
    """A batch of two rows gives each row the logits it gets alone."""
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    both = model(ids)
    for b in range(2):
        assert_close(f"row {b}", model(ids[b:b + 1])[0], both[b], 1e-5)
