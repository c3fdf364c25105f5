"""Split-KV absorbed MLA decode over the paged latent cache vs the naive absorbed and MHA forms.

CPU: the kernels under the interpreter at tiny shapes (forced splits, scattered block tables, padding
rows, non-power-of-two latent widths, launch overrides). GPU: the real shape (H=32, Dn=128, Dr=64, Dv=128,
R=512) in bf16 up to 200K tokens and several block sizes, and CUDA-graph capture / replay with changing
lengths. The oracle is `naive_mla_decode` run in fp32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.mla.decode import decode_num_splits, mla_decode
from kimi_linear.ops.mla.naive import gather_latent, mla_attention_mha, naive_mla_decode


def reference_decode(q, cache, tables, lens, w, Dv, scale):
    """The naive absorbed form in fp32."""
    return naive_mla_decode(q.float(), cache.float(), tables, lens, w.float(), Dv, scale)


def _setup(N, H, Dn, Dr, Dv, R, BS, seq_lens, dtype, device, spare_blocks=3):
    """A cache whose blocks are handed out in a random order (tables are scattered, not contiguous)."""
    need = [(L + BS - 1) // BS for L in seq_lens]
    max_blocks = max(max(need), 1)
    NB = sum(need) + spare_blocks
    perm = torch.randperm(NB).tolist()
    tables = torch.zeros(N, max_blocks, dtype=torch.int32)
    k = 0
    for n, nb in enumerate(need):
        tables[n, :nb] = torch.tensor(perm[k:k + nb], dtype=torch.int32)
        k += nb
    cache = torch.randn(NB, BS, R + Dr).to(dtype)
    q = torch.randn(N, H, Dn + Dr).to(dtype)
    w = (torch.randn(H * (Dn + Dv), R) / R ** 0.5).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q.to(device), cache.to(device), tables.to(device), lens.to(device), w.to(device)


def _mha_reference(q, cache, tables, lens, w, Dv, scale):
    R = w.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], Dv, dtype=torch.float32, device=q.device)
    for n, L in enumerate(lens.tolist()):
        if L > 0:
            kv = gather_latent(cache, tables[n], L).float()
            out[n:n + 1] = mla_attention_mha(q[n:n + 1].float(), kv[:, :R], kv[:, R:], w.float(), Dv, scale)
    return out


CASES = [
    pytest.param([1], 4, id="L1"),
    pytest.param([17, 1, 8, 0], 4, id="varlen-pad-bs4"),
    pytest.param([16, 33, 0, 5], 16, id="block-boundary-bs16"),
    pytest.param([70, 2], 8, id="several-blocks-bs8"),
]


@pytest.mark.parametrize("seq_lens,BS", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_naive(seq_lens, BS, dtype, device, poison_empty):
    H, Dn, Dr, Dv, R = 4, 16, 16, 16, 32
    q, cache, tables, lens, w = _setup(len(seq_lens), H, Dn, Dr, Dv, R, BS, seq_lens, dtype, device)
    scale = (Dn + Dr) ** -0.5
    got = mla_decode(q, cache, tables, lens, w, Dv, scale, {}, num_splits=3, min_chunk=8)
    assert got.shape == (len(seq_lens), H, Dv) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("decode vs absorbed", reference_decode(q, cache, tables, lens, w, Dv, scale), got.float(), tol)
    assert_close("decode vs mha", _mha_reference(q, cache, tables, lens, w, Dv, scale), got.float(), tol)
    for n, L in enumerate(seq_lens):
        if L == 0:
            assert torch.count_nonzero(got[n]) == 0, "padding row must be zeros"


def test_decode_odd_widths_and_default_splits(device, poison_empty):
    """Latent / key-part widths that are not powers of two (masked lanes), default split count."""
    H, Dn, Dr, Dv, R = 3, 8, 12, 20, 40
    seq_lens = [45, 3, 130]
    q, cache, tables, lens, w = _setup(3, H, Dn, Dr, Dv, R, 32, seq_lens, torch.float32, device)
    scale = (Dn + Dr) ** -0.5
    extras = {}
    got = mla_decode(q, cache, tables, lens, w, Dv, scale, extras, min_chunk=16)
    assert_close("odd widths", reference_decode(q, cache, tables, lens, w, Dv, scale), got.float(), 1e-5)
    assert "mla_decode_ws" in extras, "the split scratch is kept in extras for reuse"
    ws = extras["mla_decode_ws"][1]
    again = mla_decode(q, cache, tables, lens, w, Dv, scale, extras, min_chunk=16)
    assert extras["mla_decode_ws"][1] is ws and torch.equal(got, again)


@pytest.mark.parametrize("block_n,block_h,prefetch,dual_load", [(16, 16, True, False), (32, 32, False, False),
                                                                 (16, 32, True, True), (16, 64, False, False)])
def test_decode_launch_overrides(block_n, block_h, prefetch, dual_load, device, poison_empty):
    """Launch overrides: block-id prefetch on / off, tiles that span several cache blocks (block size 8),
    head groups (20 heads in groups of 16, or one group of 64 with 44 masked: the wgmma-sized launch), padding
    rows."""
    H, Dn, Dr, Dv, R = 20, 16, 16, 16, 32
    seq_lens = [150, 1, 0, 33]
    q, cache, tables, lens, w = _setup(4, H, Dn, Dr, Dv, R, 8, seq_lens, torch.float32, device)
    ref = reference_decode(q, cache, tables, lens, w, Dv, 0.25)
    got = mla_decode(q, cache, tables, lens, w, Dv, 0.25, num_splits=3, min_chunk=16, prefetch=prefetch,
                     block_n=block_n, block_h=block_h, dual_load=dual_load)
    assert_close(f"BN={block_n} BH={block_h} prefetch={prefetch} dual={dual_load}", ref, got.float(), 1e-5)
    assert torch.count_nonzero(got[2]) == 0


def test_decode_reduces_many_splits(device, poison_empty):
    """More active splits than the reduction merges per load (REDUCE_BLOCK_S): several merge rounds, a
    length that leaves the last round partly masked, a padding row."""
    import kimi_linear.ops.mla.decode as dec

    H, Dn, Dr, Dv, R = 2, 16, 16, 16, 32
    seq_lens = [16 * (dec.REDUCE_BLOCK_S * 2 + 5) + 3, 0, 40]
    q, cache, tables, lens, w = _setup(3, H, Dn, Dr, Dv, R, 16, seq_lens, torch.float32, device)
    ref = reference_decode(q, cache, tables, lens, w, Dv, 0.3)
    got = mla_decode(q, cache, tables, lens, w, Dv, 0.3, num_splits=dec.REDUCE_BLOCK_S * 3, min_chunk=16,
                     block_n=16)
    assert_close("many splits", ref, got.float(), 1e-5)
    assert torch.count_nonzero(got[1]) == 0


def test_decode_bf16_default_launch(device, poison_empty):
    """The default launch in bf16 (32-token tiles, default split count)."""
    H, Dn, Dr, Dv, R = 4, 16, 16, 16, 32
    seq_lens = [200, 0, 9]
    q, cache, tables, lens, w = _setup(3, H, Dn, Dr, Dv, R, 16, seq_lens, torch.bfloat16, device)
    ref = reference_decode(q, cache, tables, lens, w, Dv, 0.25)
    got = mla_decode(q, cache, tables, lens, w, Dv, 0.25, min_chunk=16)
    assert_close("bf16 default", ref, got.float(), 1e-2)
    assert torch.count_nonzero(got[1]) == 0


def test_decode_rejects_mismatched_shapes(device):
    q, cache, tables, lens, w = _setup(1, 2, 16, 16, 16, 16, 4, [3], torch.float32, device)
    with pytest.raises(ValueError, match="kv_b_proj weight has 64 rows"):
        mla_decode(q, cache[..., :-1].contiguous(), tables, lens, w, 16, 0.2)


def test_num_splits_rules(monkeypatch):
    """About two programs per SM, at least 4, at most MAX_SPLITS; a shape-only rule."""
    import kimi_linear.ops.mla.decode as dec

    monkeypatch.setattr(dec, "_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert [decode_num_splits(n, 32, dev) for n in (1, 8, 256)] == [264, 33, 4]
    assert decode_num_splits(1, 64, dev) == 132  # two head groups
    for n in range(1, 300):
        assert 4 <= decode_num_splits(n, 32, dev) <= dec.MAX_SPLITS


def test_decode_ignores_unused_table_entries(device):
    """Entries past a sequence's length (padding, stale ids) are never read: garbage ids change nothing."""
    H, Dn, Dr, Dv, R = 2, 16, 16, 16, 16
    q, cache, tables, lens, w = _setup(2, H, Dn, Dr, Dv, R, 4, [5, 0], torch.float32, device)
    a = mla_decode(q, cache, tables, lens, w, Dv, 0.2, num_splits=2, min_chunk=4)
    bad = tables.clone()
    bad[0, 2:] = 10 ** 8
    bad[1, :] = -(10 ** 8)
    b = mla_decode(q, cache, bad, lens, w, Dv, 0.2, num_splits=2, min_chunk=4)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("BS", [16, 64, 256])
def test_decode_real_shape_gpu(BS):
    H, Dn, Dr, Dv, R = 32, 128, 64, 128, 512
    seq_lens = [1, 17, BS, BS + 1, 1000, 0, 5000, 33000]
    q, cache, tables, lens, w = _setup(len(seq_lens), H, Dn, Dr, Dv, R, BS, seq_lens, torch.bfloat16, "cuda")
    scale = (Dn + Dr) ** -0.5
    got = mla_decode(q, cache, tables, lens, w, Dv, scale, {})
    ref = reference_decode(q, cache, tables, lens, w, Dv, scale)
    for n, L in enumerate(seq_lens):
        if L > 0:
            assert_close(f"real shape BS={BS} L={L}", ref[n], got[n].float(), 1e-2)
        else:
            assert torch.count_nonzero(got[n]) == 0
    # one long sequence at batch 1 uses every split
    q1, cache1, t1, l1, w1 = _setup(1, H, Dn, Dr, Dv, R, BS, [200_000], torch.bfloat16, "cuda")
    assert_close("L=200K", reference_decode(q1, cache1, t1, l1, w1, Dv, scale),
                 mla_decode(q1, cache1, t1, l1, w1, Dv, scale).float(), 1e-2)
    assert_close("vs mha", _mha_reference(q[:5], cache, tables[:5], lens[:5], w, Dv, scale),
                 got[:5].float(), 1e-2)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    H, Dn, Dr, Dv, R, BS, N = 32, 128, 64, 128, 512, 64, 8
    max_len = 4096
    q, cache, tables, lens, w = _setup(N, H, Dn, Dr, Dv, R, BS, [max_len] * N, torch.bfloat16, "cuda")
    scale = (Dn + Dr) ** -0.5
    extras = {}
    s_q, s_tables, s_lens = q.clone(), tables.clone(), lens.clone()
    s_lens.fill_(7)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mla_decode(s_q, cache, s_tables, s_lens, w, Dv, scale, extras)  # warm up (compile, scratch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = mla_decode(s_q, cache, s_tables, s_lens, w, Dv, scale, extras)
    for step, new_lens in enumerate([[1, 2, 63, 64, 65, 4095, 0, 4096], [4096, 0, 1, 100, 2000, 3, 4000, 17]]):
        s_q.copy_(torch.randn_like(s_q))
        s_tables.copy_(tables[torch.randperm(N, device="cuda")])
        s_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_decode(s_q, cache, s_tables, s_lens, w, Dv, scale)
        assert_close(f"graph replay {step}", ref, s_out.float(), 1e-2)
        eager = mla_decode(s_q, cache, s_tables, s_lens, w, Dv, scale, {})
        assert_close(f"replay {step} vs eager", eager.float(), s_out.float(), 1e-3)


@pytest.mark.gpu
def test_num_splits_is_shape_only():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert decode_num_splits(1, 32, dev) >= sms
    assert decode_num_splits(256, 32, dev) == 4
