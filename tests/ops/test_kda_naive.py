"""The reference KDA ops agree with each other: chunked == recurrent, gate, varlen, state pool."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from kimi_linear.ops.kda import kda_gate, naive_chunk_kda, naive_recurrent_kda


def make_inputs(B, T, H, K, V, seed=0, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    f = torch.randn(B, T, H, K, generator=g) + (2.0 if strong_decay else 0.0)
    beta = torch.randn(B, T, H, generator=g)
    A_log = torch.empty(H).uniform_(1, 16, generator=g).log()
    dt_bias = torch.empty(H * K).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
    dt_bias = dt_bias + torch.log(-torch.expm1(-dt_bias))
    return q, k, v, f, beta, A_log, dt_bias


def test_gate_matches_formula():
    f = torch.randn(3, 5, 2 * 8) * 10  # exercises the softplus threshold
    A_log = torch.randn(1, 1, 2, 1)
    dt_bias = torch.randn(16)
    g = kda_gate(f, A_log, dt_bias, 8)
    x = (f + dt_bias).view(3, 5, 2, 8)
    ref = -A_log.view(2, 1).exp() * F.softplus(x, beta=1.0, threshold=20.0)
    assert g.shape == (3, 5, 2, 8) and g.dtype == torch.float32
    assert_close("gate", ref, g, 1e-6)


@pytest.mark.parametrize("T", [1, 17, 63, 64, 65, 130, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strong", [False, True], ids=["weak", "strong"])
def test_chunk_equals_recurrent(T, strong):
    B, H, K, V = 2, 2, 16, 12
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T, H, K, V, seed=T, strong_decay=strong)
    h0 = torch.randn(B, H, K, V)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True, initial_state=h0, output_final_state=True)
    o_r, s_r = naive_recurrent_kda(q, k, v, f, beta, **kw)
    o_c, s_c = naive_chunk_kda(q, k, v, f, beta, **kw)
    assert_close("o", o_r, o_c, 1e-5)
    assert_close("final_state", s_r, s_c, 1e-5)


def test_recurrent_matches_delta_rule_definition():
    """S_t = (I - b k k^T) diag(a) S_{t-1} + b k v^T; o_t = S_t^T (s q_t), written as matrices."""
    B, T, H, K, V = 1, 9, 1, 6, 5
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T, H, K, V)
    g = kda_gate(f, A_log, dt_bias, K)
    b = torch.sigmoid(beta)
    o, S = naive_recurrent_kda(q, k, v, g, b, output_final_state=True)
    s = K ** -0.5
    St = torch.zeros(K, V)
    for t in range(T):
        kt, vt, qt, bt = k[0, t, 0], v[0, t, 0], q[0, t, 0], b[0, t, 0]
        St = (torch.eye(K) - bt * torch.outer(kt, kt)) @ torch.diag(g[0, t, 0].exp()) @ St + bt * torch.outer(kt, vt)
        assert_close(f"o[{t}]", St.t() @ (s * qt), o[0, t, 0], 1e-5)
    assert_close("S", St, S[0, 0], 1e-5)


def test_varlen_equals_separate_sequences():
    H, K, V = 2, 16, 16
    lens = [1, 17, 64, 100]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    q, k, v, f, beta, A_log, dt_bias = make_inputs(1, T, H, K, V, seed=3)
    h0 = torch.randn(len(lens), H, K, V)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True)
    o, s = naive_chunk_kda(q, k, v, f, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = naive_recurrent_kda(q[:, a:b], k[:, a:b], v[:, a:b], f[:, a:b], beta[:, a:b],
                                       initial_state=h0[n:n + 1], output_final_state=True, **kw)
        assert_close(f"o[seq {n}]", o_n, o[:, a:b], 1e-5)
        assert_close(f"state[seq {n}]", s_n[0], s[n], 1e-5)


@pytest.mark.parametrize("fn", [naive_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_state_pool_in_place_and_poisoned_slots(fn):
    H, K, V = 2, 8, 8
    lens = [3, 70]
    cu = torch.tensor([0, 3, 73], dtype=torch.int32)
    q, k, v, f, beta, A_log, dt_bias = make_inputs(1, 73, H, K, V, seed=5)
    pool = torch.full((6, H, K, V), 1e30)
    idx = torch.tensor([4, 1], dtype=torch.int32)
    init = torch.randn(2, H, K, V)
    pool[idx.long()] = init
    untouched = pool.clone()
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True, cu_seqlens=cu)
    o, final = fn(q, k, v, f, beta, initial_state=pool, state_indices=idx, **kw)
    assert final is None
    o_ref, s_ref = naive_recurrent_kda(q, k, v, f, beta, initial_state=init, output_final_state=True, **kw)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("pool[4]", s_ref[0], pool[4], 1e-5)
    assert_close("pool[1]", s_ref[1], pool[1], 1e-5)
    for slot in (0, 2, 3, 5):
        assert torch.equal(pool[slot], untouched[slot]), f"slot {slot} was written"
    assert len(lens) == 2
