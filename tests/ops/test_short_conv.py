"""The Triton short conv equals `naive_causal_conv1d`: varlen prefill and decode, the conv-state pool
(updated in place, unused slots bit-identical), padding rows, W in {2, 3, 4}, bf16 and fp32.

On the CPU the kernels run under TRITON_INTERPRET=1 at small shapes; `gpu` tests use C = 3 * 32 * 128
(the model's q|k|v channels) and a CUDA-graph capture/replay of the decode step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear.ops.conv import naive_causal_conv1d
from kimi_linear.ops.conv.short_conv import causal_conv1d


def cu_of(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def tol_of(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 1e-6


def pool_case(N, W, C, device, dtype, seed=0):
    """A pool 3x larger than the batch, unused slots 1e30, used ones random; a permuted index."""
    S = 3 * N
    pool = torch.full((S, W - 1, C), 1e30, device=device, dtype=dtype)
    idx = torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:N].to(device, torch.int32)
    pool[idx.long()] = torch.randn(N, W - 1, C, device=device).to(dtype)
    return pool, idx


def check_pool(ref_pool, pool, before, used):
    assert torch.equal(ref_pool[used], pool[used]), "updated windows differ (they are copies of inputs)"
    rest = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    rest[used] = False
    assert torch.equal(pool[rest], before[rest]), "unused slots changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_varlen_prefill_with_pool(W, dtype, device, poison_empty):
    lens = [1, 2, 3, 17, 64]
    C = 40  # not a power of two: channel masks
    x = torch.randn(sum(lens), C, device=device).to(dtype)
    w = torch.randn(C, W, device=device).to(dtype)
    pool, idx = pool_case(len(lens), W, C, device, dtype, seed=W)
    before, ref_pool = pool.clone(), pool.clone()
    cu = cu_of(lens, device)
    y_ref = naive_causal_conv1d(x, w, ref_pool, cu, idx)
    y = causal_conv1d(x, w, pool, cu, idx)
    assert y.dtype == dtype
    assert_close("y", y_ref, y, tol_of(dtype))
    check_pool(ref_pool, pool, before, idx.long())


@pytest.mark.parametrize("W", [2, 4])
def test_decode_steps_continue_prefill(W, device):
    """Prefill, then several single-token decode steps (and a 3-token step): equals one long conv."""
    C, N = 24, 3
    w = torch.randn(C, 1, W, device=device)  # the layer's [C, 1, W] weight shape
    full = torch.randn(N, 10, C, device=device)
    pool, idx = pool_case(N, W, C, device, torch.float32, seed=1)
    pool[idx.long()] = 0  # fresh sequences
    ref_pool = pool.clone()
    steps = [[4, 2, 1], [1, 1, 1], [1, 1, 1], [3, 1, 2]]
    pos = [0] * N
    for lens in steps:
        x = torch.cat([full[n, pos[n]:pos[n] + L] for n, L in enumerate(lens)])
        cu = cu_of(lens, device)
        y_ref = naive_causal_conv1d(x, w, ref_pool, cu, idx)
        y = causal_conv1d(x, w, pool, cu, idx)
        assert_close(f"y {lens}", y_ref, y, 1e-6)
        assert torch.equal(ref_pool, pool)
        pos = [p + L for p, L in zip(pos, lens)]


def test_single_sequence_decode(device):
    """Batch of one decode token (cu_seqlens [0, 1]): the shape Triton specialises (N == 1)."""
    C, W = 24, 4
    w = torch.randn(C, W, device=device)
    pool, idx = pool_case(1, W, C, device, torch.float32, seed=4)
    cu = cu_of([1], device)
    for _ in range(3):
        x = torch.randn(1, C, device=device)
        ref_pool = pool.clone()
        assert_close("y", naive_causal_conv1d(x, w, ref_pool, cu, idx), causal_conv1d(x, w, pool, cu, idx), 1e-6)
        assert torch.equal(ref_pool, pool)


def test_no_state_no_cu_no_activation(device, poison_empty):
    x = torch.randn(37, 20, device=device)
    w = torch.randn(20, 4, device=device)
    assert_close("silu", naive_causal_conv1d(x, w), causal_conv1d(x, w), 1e-6)
    assert_close("linear", naive_causal_conv1d(x, w, activation=None), causal_conv1d(x, w, activation=None), 1e-6)
    cu = cu_of([5, 30, 2], device)
    assert_close("varlen", naive_causal_conv1d(x, w, cu_seqlens=cu), causal_conv1d(x, w, cu_seqlens=cu), 1e-6)


def test_state_without_indices_uses_slot_n(device):
    C, W = 16, 4
    x = torch.randn(6, C, device=device)
    w = torch.randn(C, W, device=device)
    state = torch.randn(2, W - 1, C, device=device)
    ref = state.clone()
    cu = cu_of([2, 4], device)
    assert_close("y", naive_causal_conv1d(x, w, ref, cu), causal_conv1d(x, w, state, cu), 1e-6)
    assert torch.equal(ref, state)


def test_negative_index_and_padded_rows(device, poison_empty):
    """A negative slot gives zero output and touches nothing; rows past cu_seqlens[N] are zeros."""
    C, W = 16, 4
    x = torch.randn(7, C, device=device)
    w = torch.randn(C, W, device=device)
    pool = torch.randn(4, W - 1, C, device=device)
    idx = torch.tensor([2, -1, 0], dtype=torch.int32, device=device)
    lens = [1, 2, 2]
    before, ref_pool = pool.clone(), pool.clone()
    cu = cu_of(lens, device)
    y_ref = naive_causal_conv1d(x[:5], w, ref_pool, cu, idx)
    y = causal_conv1d(x, w, pool, cu, idx)
    assert_close("y", y_ref, y[:5], 1e-6)
    assert torch.equal(y[1:3], torch.zeros_like(y[1:3]))
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))
    assert torch.equal(pool, ref_pool)
    assert torch.equal(pool[[1, 3]], before[[1, 3]])


def test_bad_inputs_raise(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(8, 4, device=device), activation="gelu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(6, 4, device=device))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d(x, torch.randn(8, 4, device=device), torch.zeros(2, 2, 8, device=device))


# ---- GPU: the model's channel count and CUDA graphs ---------------------------------------------------

@pytest.mark.gpu
def test_gpu_real_channels_prefill_and_decode():
    C, W = 3 * 32 * 128, 4
    lens = [1, 2, 3, 17, 64, 300]
    w = torch.randn(C, W, device="cuda").bfloat16()
    pool, idx = pool_case(len(lens), W, C, "cuda", torch.bfloat16, seed=2)
    before, ref_pool = pool.clone(), pool.clone()
    x = torch.randn(sum(lens), C, device="cuda").bfloat16()
    cu = cu_of(lens, "cuda")
    assert_close("prefill", naive_causal_conv1d(x, w, ref_pool, cu, idx), causal_conv1d(x, w, pool, cu, idx), 1e-2)
    check_pool(ref_pool, pool, before, idx.long())
    x1 = torch.randn(len(lens), C, device="cuda").bfloat16()
    cu1 = cu_of([1] * len(lens), "cuda")
    assert_close("decode", naive_causal_conv1d(x1, w, ref_pool, cu1, idx), causal_conv1d(x1, w, pool, cu1, idx), 1e-2)
    check_pool(ref_pool, pool, before, idx.long())


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 16])
def test_gpu_cuda_graph_decode_step(N):
    C, W = 3 * 32 * 128, 4
    w = torch.randn(C, W, device="cuda").bfloat16()
    pool, idx = pool_case(N, W, C, "cuda", torch.bfloat16, seed=3)
    if N > 4:
        idx[4] = -1
    cu = cu_of([1] * N, "cuda")
    x = torch.randn(N, C, device="cuda").bfloat16()
    y = None

    def step():
        return causal_conv1d(x, w, pool, cu, idx)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(2):
        x.copy_(torch.randn(N, C, device="cuda").bfloat16())
        ref_pool = pool.clone()
        y_ref = naive_causal_conv1d(x, w, ref_pool, cu, idx)
        graph.replay()
        torch.cuda.synchronize()
        assert_close("y", y_ref, y, 1e-2)
        assert torch.equal(ref_pool, pool)
