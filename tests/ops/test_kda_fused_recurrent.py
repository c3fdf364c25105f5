"""The fused recurrent KDA kernel equals the fp32 naive recurrence: outputs, final states, the state pool.

On the CPU the kernel runs under TRITON_INTERPRET=1 at small shapes (several V tiles, odd K / V for the
masks); `gpu` tests run the real shape (H=32, K=V=128) and a CUDA-graph capture/replay of the step.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.kda import naive_recurrent_kda
from kimi_linear.ops.kda.fused_recurrent import fused_recurrent_kda

GATE = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def make_inputs(B, T, H, K, V, device, dtype=torch.float32, seed=0):
    """Random q, k, v, raw gate f, beta logits, and realistic A_log = log U(1, 16), dt_bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    f = torch.randn(B, T, H, K, generator=g) * 2.0  # mixes strong and weak decays
    beta = torch.randn(B, T, H, generator=g)
    A_log = torch.empty(H).uniform_(1, 16, generator=g).log()
    dt_bias = torch.empty(H * K).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
    dt_bias = dt_bias + torch.log(-torch.expm1(-dt_bias))
    xs = [t.to(device, dtype) for t in (q, k, v, f, beta)]
    return (*xs, A_log.view(1, 1, H, 1).to(device), dt_bias.to(device))


def cu_of(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def tol_of(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H,K,V,block_v", [(2, 1, 2, 16, 32, 8), (3, 3, 2, 16, 32, None),
                                               (1, 4, 3, 12, 20, 8)], ids=["B2T1", "B3T3", "oddKV"])
def test_gate_in_kernel_matches_naive(B, T, H, K, V, block_v, dtype, device, poison_empty):
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T, H, K, V, device, dtype)
    h0 = torch.randn(B, H, K, V, device=device)
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, f, beta, **kw)
    o, s = fused_recurrent_kda(q, k, v, f, beta, **kw, block_v=block_v)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o_ref, o, tol_of(dtype))
    assert_close("final_state", s_ref, s, tol_of(dtype))


def test_precomputed_gate_beta_and_scale(device, poison_empty):
    """g given as log decay, beta given post-sigmoid, no L2 norm, explicit scale, no initial state."""
    B, T, H, K, V = 2, 3, 2, 16, 16
    q, k, v, f, beta, _, _ = make_inputs(B, T, H, K, V, device)
    k = torch.nn.functional.normalize(k, dim=-1)
    g = torch.nn.functional.logsigmoid(f)
    b = beta.sigmoid()
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, b, scale=0.3, output_final_state=True)
    o, s = fused_recurrent_kda(q, k, v, g, b, scale=0.3, output_final_state=True)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", s_ref, s, 1e-5)
    o2, s2 = fused_recurrent_kda(q, k, v, g, b, scale=0.3)
    assert s2 is None and torch.equal(o, o2)


def test_gate_without_dt_bias(device):
    B, T, H, K, V = 1, 2, 2, 16, 16
    q, k, v, f, beta, A_log, _ = make_inputs(B, T, H, K, V, device)
    f = f * 15.0  # crosses the softplus threshold 20
    kw = dict(GATE, A_log=A_log, output_final_state=True)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, f, beta, **kw)
    o, s = fused_recurrent_kda(q, k, v, f, beta, **kw)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", s_ref, s, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_matches_naive(dtype, device, poison_empty):
    lens = [1, 2, 3, 17, 64]
    H, K, V = 2, 16, 16
    q, k, v, f, beta, A_log, dt_bias = make_inputs(1, sum(lens), H, K, V, device, dtype, seed=1)
    h0 = torch.randn(len(lens), H, K, V, device=device)
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True,
              cu_seqlens=cu_of(lens, device))
    o_ref, s_ref = naive_recurrent_kda(q, k, v, f, beta, **kw)
    o, s = fused_recurrent_kda(q, k, v, f, beta, **kw)
    assert_close("o", o_ref, o, tol_of(dtype))
    assert_close("final_state", s_ref, s, tol_of(dtype))


def _pool_case(lens, H, K, V, device, dtype, seed):
    """A pool 3x larger than the batch, unused slots 1e30; index permuted, entry 1 negative (N > 1)."""
    N = len(lens)
    S = 3 * N
    pool = torch.full((S, H, K, V), 1e30, device=device)
    idx = torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:N]
    if N > 1:
        idx[1] = -1
    used = idx[idx >= 0].to(device)
    pool[used] = torch.randn(len(used), H, K, V, device=device)
    return pool, idx.to(device=device, dtype=torch.int32), used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens", [[1, 1, 1, 1], [2, 3, 4, 2], [1, 2, 3, 17, 64]], ids=["T1", "T2-4", "mixed"])
def test_state_pool_in_place(lens, dtype, device, poison_empty):
    H, K, V = 2, 16, 32
    q, k, v, f, beta, A_log, dt_bias = make_inputs(1, sum(lens), H, K, V, device, dtype, seed=len(lens))
    pool, idx, used = _pool_case(lens, H, K, V, device, dtype, seed=3)
    before = pool.clone()
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_of(lens, device), state_indices=idx)
    ref_pool = pool.clone()
    o_ref, _ = naive_recurrent_kda(q, k, v, f, beta, initial_state=ref_pool, **kw)
    o, final = fused_recurrent_kda(q, k, v, f, beta, initial_state=pool, output_final_state=True, **kw,
                                   block_v=8)
    assert final is None
    assert_close("o", o_ref, o, tol_of(dtype))
    cu = cu_of(lens, "cpu")
    assert torch.equal(o[0, cu[1]:cu[2]].float(), torch.zeros_like(o[0, cu[1]:cu[2]].float())), "skipped rows"
    assert_close("pool slots", ref_pool[used], pool[used], tol_of(dtype))
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=device)
    untouched[used] = False
    assert torch.equal(pool[untouched], before[untouched]), "unused slots changed"


def test_pool_batched_multi_token(device):
    """B > 1 without cu_seqlens: [B, T] tokens per sequence, state read from and written to the pool."""
    B, T, H, K, V = 3, 3, 2, 16, 16
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T, H, K, V, device, seed=7)
    pool = torch.full((9, H, K, V), 1e30, device=device)
    idx = torch.tensor([7, 2, 4], dtype=torch.int32, device=device)
    pool[idx.long()] = torch.randn(B, H, K, V, device=device)
    before, ref_pool = pool.clone(), pool.clone()
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, state_indices=idx)
    o_ref, _ = naive_recurrent_kda(q, k, v, f, beta, initial_state=ref_pool, **kw)
    o, _ = fused_recurrent_kda(q, k, v, f, beta, initial_state=pool, **kw)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("pool", ref_pool, pool, 1e-5)
    rest = torch.tensor([i for i in range(9) if i not in (7, 2, 4)], device=device)
    assert torch.equal(pool[rest], before[rest])


def test_out_buffer_strided_inputs_and_padded_rows(device):
    """q/k/v as views of one [N, 3C] tensor (the layer's layout), an `out=` buffer full of NaN, and
    token rows past cu_seqlens[N] (a padded batch): every row is written, padded ones as zeros."""
    H, K = 2, 16
    lens = [1, 1, 2]
    Tpad = sum(lens) + 2
    qkv = torch.randn(Tpad, 3 * H * K, device=device)
    q, k, v = (t.reshape(1, Tpad, H, K) for t in qkv.split(H * K, dim=-1))
    _, _, _, f, beta, A_log, dt_bias = make_inputs(1, Tpad, H, K, K, device, seed=5)
    pool = torch.randn(4, H, K, K, device=device)
    idx = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    cu = cu_of(lens, device)
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, state_indices=idx)
    ref_pool = pool.clone()
    n = sum(lens)
    o_ref, _ = naive_recurrent_kda(q[:, :n], k[:, :n], v[:, :n], f[:, :n], beta[:, :n], initial_state=ref_pool,
                                   **kw)
    out = torch.full((1, Tpad, H, K), float("nan"), device=device)
    o, _ = fused_recurrent_kda(q, k, v, f, beta, initial_state=pool, out=out, **kw)
    assert o is out
    assert_close("o", o_ref, o[:, :n], 1e-5)
    assert torch.equal(o[:, n:], torch.zeros_like(o[:, n:]))
    assert_close("pool", ref_pool, pool, 1e-5)


def test_bad_inputs_raise(device):
    q, k, v, f, beta, A_log, dt_bias = make_inputs(2, 1, 2, 16, 16, device)
    with pytest.raises(ValueError, match="A_log"):
        fused_recurrent_kda(q, k, v, f, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="state_indices needs"):
        fused_recurrent_kda(q, k, v, f, beta, state_indices=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="batch size must be 1"):
        fused_recurrent_kda(q, k, v, f, beta, cu_seqlens=cu_of([1, 1], device))
    with pytest.raises(ValueError, match="beta"):
        fused_recurrent_kda(q, k, v, f, beta[..., :1])
    with pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_kda(q, k, v, f, beta, initial_state=torch.zeros(3, 2, 16, 16, device=device))


# ---- GPU: the real shape and CUDA graphs --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 7, 64])
def test_gpu_real_shape_pool(B):
    H, K = 32, 128
    lens = [1] * B if B != 7 else [1, 2, 3, 1, 4, 1, 2]
    q, k, v, f, beta, A_log, dt_bias = make_inputs(1, sum(lens), H, K, K, "cuda", torch.bfloat16, seed=B)
    pool, idx, used = _pool_case(lens, H, K, K, "cuda", torch.bfloat16, seed=B)
    before, ref_pool = pool.clone(), pool.clone()
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_of(lens, "cuda"), state_indices=idx)
    o_ref, _ = naive_recurrent_kda(q, k, v, f, beta, initial_state=ref_pool, **kw)
    o, _ = fused_recurrent_kda(q, k, v, f, beta, initial_state=pool, **kw)
    assert_close("o", o_ref, o, 1e-2)
    assert_close("pool slots", ref_pool[used], pool[used], 1e-4)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device="cuda")
    untouched[used] = False
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_steps():
    """Capture one decode step (out= buffer, pool in place), replay it with fresh inputs twice."""
    B, H, K = 8, 32, 128
    static = list(make_inputs(1, B, H, K, K, "cuda", torch.bfloat16, seed=11))
    A_log, dt_bias = static[5], static[6]
    pool = torch.randn(3 * B, H, K, K, device="cuda")
    idx = torch.tensor([5, 0, 17, -1, 9, 3, 22, 12], dtype=torch.int32, device="cuda")
    cu = cu_of([1] * B, "cuda")
    out = torch.empty(1, B, H, K, dtype=torch.bfloat16, device="cuda")
    kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, state_indices=idx, initial_state=pool, out=out)

    def step():
        fused_recurrent_kda(*static[:5], **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (12, 13):
        fresh = make_inputs(1, B, H, K, K, "cuda", torch.bfloat16, seed=seed)
        for dst, src in zip(static[:5], fresh[:5]):
            dst.copy_(src)
        ref_pool = pool.clone()
        ref_kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, state_indices=idx, initial_state=ref_pool)
        o_ref, _ = naive_recurrent_kda(*static[:5], **ref_kw)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(f"o (replay {seed})", o_ref, out, 1e-2)
        assert_close(f"pool (replay {seed})", ref_pool, pool, 1e-4)
