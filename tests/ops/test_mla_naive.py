"""Absorbed (MQA over the latent) MLA equals MHA MLA; paged latent cache I/O round-trips."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.mla import gather_latent, mla_attention_absorbed, mla_attention_mha, write_latent


@pytest.mark.parametrize("T,L", [(1, 1), (1, 37), (5, 5), (8, 40), (33, 33)])
def test_absorbed_equals_mha(T, L):
    H, Dn, Dr, Dv, R = 4, 16, 8, 12, 24
    q = torch.randn(T, H, Dn + Dr)
    c = torch.randn(L, R)
    k_pe = torch.randn(L, Dr)
    w = torch.randn(H * (Dn + Dv), R) / R ** 0.5
    scale = (Dn + Dr) ** -0.5
    a = mla_attention_mha(q, c, k_pe, w, Dv, scale)
    b = mla_attention_absorbed(q, c, k_pe, w, Dv, scale)
    assert a.shape == (T, H, Dv)
    assert_close("absorbed vs mha", a, b, 1e-5)


def test_mha_is_causal_bottom_right():
    """Queries are the last T positions: the first query must ignore the last key."""
    H, Dn, Dr, Dv, R = 2, 8, 4, 8, 8
    q = torch.randn(3, H, Dn + Dr)
    c, k_pe = torch.randn(6, R), torch.randn(6, Dr)
    w = torch.randn(H * (Dn + Dv), R)
    out = mla_attention_mha(q, c, k_pe, w, Dv, 0.3)
    c2, k2 = c.clone(), k_pe.clone()
    c2[-1] += 100.0
    k2[-1] -= 50.0
    out2 = mla_attention_mha(q, c2, k2, w, Dv, 0.3)
    assert torch.allclose(out[:2], out2[:2])
    assert not torch.allclose(out[2], out2[2])


def test_paged_write_gather_roundtrip():
    cache = torch.zeros(10, 4, 6)
    table = torch.tensor([7, 2, 5], dtype=torch.int32)
    L = 11
    latents = torch.randn(L, 6)
    slots = torch.tensor([table[p // 4].item() * 4 + p % 4 for p in range(L)])
    write_latent(cache, slots, latents)
    assert torch.equal(gather_latent(cache, table, L), latents)
    # negative slots are skipped
    before = cache.clone()
    write_latent(cache, torch.tensor([-1, 0]), torch.randn(2, 6))
    assert torch.equal(cache.view(-1, 6)[1:], before.view(-1, 6)[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_latent_matches_naive_and_skips_padding(dtype, device):
    from kimi_linear.ops.mla.cache_write import write_latent_cache

    cache = torch.randn(6, 4, 40, device=device).to(dtype)
    ref = cache.clone()
    latent = torch.randn(5, 40, device=device)
    slots = torch.tensor([7, -1, 0, 23, -1], device=device)
    write_latent_cache(cache, slots, latent)
    write_latent(ref, slots, latent)
    assert torch.equal(cache, ref)
