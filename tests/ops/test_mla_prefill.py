"""MLA prefill (chunked flash MHA over key chunks) vs the naive MHA form, and the layer's kernel wiring.

Mixed batches: sequences with cached context (chunked prefill), decode-like rows (one new token),
empty rows, fresh prompts, and key chunks small enough to force log-sum-exp merges. The layer test runs
MultiHeadLatentAttention through the kernels (interpreter on CPU) and through the naive ops on the same
steps of chunked prefill, mixed batches and decode, and compares the outputs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.mla.naive import gather_latent, mla_attention_mha, write_latent
from kimi_linear.ops.mla.prefill import mla_prefill


def _batch(query_lens, context_lens, H, Dn, Dr, Dv, R, BS, dtype, device):
    N = len(query_lens)
    need = [(c + q + BS - 1) // BS for q, c in zip(query_lens, context_lens)]
    NB = sum(need) + 2
    perm = torch.randperm(NB).tolist()
    tables = torch.zeros(N, max(max(need), 1), dtype=torch.int32)
    k = 0
    for n, nb in enumerate(need):
        tables[n, :nb] = torch.tensor(perm[k:k + nb], dtype=torch.int32)
        k += nb
    T = sum(query_lens)
    cache = torch.randn(NB, BS, R + Dr).to(dtype)
    latent = torch.randn(T, R + Dr).to(dtype)
    slots = [int(tables[n, p // BS]) * BS + p % BS
             for n, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c, c + q)]
    write_latent(cache, torch.tensor(slots, dtype=torch.long), latent)
    q = torch.randn(T, H, Dn + Dr).to(dtype)
    w = (torch.randn(H * (Dn + Dv), R) / R ** 0.5).to(dtype)
    return [t.to(device) for t in (q, latent, cache, tables, w)]


def _reference(q, cache, tables, query_lens, context_lens, w, Dv, scale):
    R = w.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], Dv, dtype=torch.float32, device=q.device)
    st = 0
    for n, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        if ql:
            kv = gather_latent(cache, tables[n], cl + ql).float()
            out[st:st + ql] = mla_attention_mha(q[st:st + ql].float(), kv[:, :R], kv[:, R:], w.float(), Dv, scale)
        st += ql
    return out


@pytest.mark.parametrize("key_chunk", [None, 8], ids=["one-chunk", "chunked-keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_mixed_batch(key_chunk, dtype, device, poison_empty):
    H, Dn, Dr, Dv, R, BS = 2, 16, 16, 16, 32, 4
    query_lens = [5, 1, 9, 0, 3, 1]
    context_lens = [0, 7, 6, 3, 13, 0]
    q, latent, cache, tables, w = _batch(query_lens, context_lens, H, Dn, Dr, Dv, R, BS, dtype, device)
    scale = (Dn + Dr) ** -0.5
    got = mla_prefill(q, latent, cache, tables, query_lens, context_lens, w, Dv, scale, key_chunk=key_chunk)
    assert got.shape == (sum(query_lens), H, Dv) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("prefill vs mha", _reference(q, cache, tables, query_lens, context_lens, w, Dv, scale),
                 got.float(), tol)


def test_prefill_without_cache(device, poison_empty):
    """ForwardContext.for_prefill: no cache, no tables; odd head widths and a tile-crossing length."""
    H, Dn, Dr, Dv, R = 3, 24, 8, 20, 40
    query_lens = [70, 1, 2]
    T = sum(query_lens)
    q = torch.randn(T, H, Dn + Dr, device=device)
    latent = torch.randn(T, R + Dr, device=device)
    w = torch.randn(H * (Dn + Dv), R, device=device) / R ** 0.5
    got = mla_prefill(q, latent, None, None, query_lens, [0, 0, 0], w, Dv, 0.17)
    st = 0
    for ql in query_lens:
        ref = mla_attention_mha(q[st:st + ql], latent[st:st + ql, :R], latent[st:st + ql, R:], w, Dv, 0.17)
        assert_close(f"no cache T={ql}", ref, got[st:st + ql], 1e-5)
        st += ql


def test_layer_kernel_path_matches_naive(monkeypatch):
    """MultiHeadLatentAttention (tiny config, fp32): kernels (interpreter) == naive ops, step by step."""
    from kimi_linear.config import ModelConfig
    from kimi_linear.layers.mla import MultiHeadLatentAttention
    from kimi_linear.tools.presets import preset_config
    from kimi_linear.models.sequence_cache import SequenceCache
    from kimi_linear.ops.dispatch import is_interpreter

    if not is_interpreter():
        pytest.skip("the CPU kernel path needs the Triton interpreter")
    config = ModelConfig.from_dict(preset_config("tiny"))
    idx = config.mla_layers[0]
    layer = MultiHeadLatentAttention(config, idx)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    steps = [[6, 9], [5, 1], [1, 1], [1, 7], [1, 1]]  # prefill, chunked + mixed, decode, mixed, decode
    outs = {}
    for mode in ("naive", "kernel"):
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1" if mode == "kernel" else "0")
        torch.manual_seed(1)
        cache = SequenceCache(config, 2, block_size=4, initial_blocks=16)
        res = []
        for ql in steps:
            ctx = cache.begin_step(ql)
            x = torch.randn(sum(ql), config.hidden_size)
            with torch.no_grad():
                res.append(layer(x, ctx))
            cache.end_step()
        outs[mode] = torch.cat(res)
    assert_close("layer kernels vs naive", outs["naive"], outs["kernel"], 1e-5)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("key_chunk", [None, 4096], ids=["one-chunk", "chunked-keys"])
def test_prefill_real_shape_gpu(key_chunk):
    H, Dn, Dr, Dv, R, BS = 32, 128, 64, 128, 512, 64
    query_lens = [700, 513, 1, 1, 600, 0]
    context_lens = [0, 3000, 4000, 0, 12000, 64]
    q, latent, cache, tables, w = _batch(query_lens, context_lens, H, Dn, Dr, Dv, R, BS, torch.bfloat16, "cuda")
    scale = (Dn + Dr) ** -0.5
    got = mla_prefill(q, latent, cache, tables, query_lens, context_lens, w, Dv, scale, key_chunk=key_chunk)
    ref = _reference(q, cache, tables, query_lens, context_lens, w, Dv, scale)
    st = 0
    for ql, cl in zip(query_lens, context_lens):
        if ql:
            assert_close(f"real shape q={ql} ctx={cl}", ref[st:st + ql], got[st:st + ql].float(), 1e-2)
        st += ql


def test_prefill_tile_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/mla_prefill.py at tiny shapes under the interpreter: the default tiles match the fp32
    reference and another configuration (128-query tiles, 8 warps) matches the default, merged chunk and
    causal first chunk; `prefill.TILES` is restored."""
    import json

    from benchmarks import mla_prefill
    from kimi_linear.ops.mla import prefill as P

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    default = P.TILES
    out = tmp_path / "pf.json"
    args = ["--small", "--tiles", "64x64x4x3,128x32x8x3", "--json", str(out)]
    assert mla_prefill.main(args + ([] if torch.cuda.is_available() else ["--device", "cpu"])) == 0
    rep = json.loads(out.read_text())
    assert rep["ref_err"] < 2e-2 and P.TILES == default
    assert len(rep["results"]) == 4 and all(r["vs_default"] < 1e-2 for r in rep["results"])
