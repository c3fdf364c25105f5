"""Reference Kimi Delta Attention in fp32 torch: the gate, the token recurrence and the chunked form.

These are the permanent oracles for the Triton kernels and the CPU path of the model.

Shapes (the vocabulary used everywhere): q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] (log decay,
<= 0, or the raw gate input when `use_gate_in_kernel`); beta [B, T, H]; states [N, H, K, V] fp32,
laid out so that o_t = S_t^T (scale * q_t). Variable length: B = 1 with `cu_seqlens` [N + 1].

Token step (spec section 3.1): S <- diag(exp(g_t)) S; u = beta_t (v_t - S^T k_t); S <- S + k_t u^T;
o_t = S^T (scale q_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.errors import KDAError
from kimi_linear.ops.norm.naive import l2norm


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """g = -exp(A_log[h]) * softplus(f + dt_bias) in fp32 (softplus threshold 20).

    f: [..., H * K] or [..., H, K]; A_log: any shape holding H values; dt_bias: [H * K] or None.
    Returns g [..., H, K] fp32.
    """
    x = f.float()
    if x.shape[-1] != head_dim:
        x = x.unflatten(-1, (-1, head_dim))
    H = x.shape[-2]
    if dt_bias is not None:
        x = x + dt_bias.float().view(H, head_dim)
    sp = torch.where(x > 20.0, x, torch.log1p(torch.exp(torch.clamp(x, max=20.0))))
    return -torch.exp(A_log.float().reshape(H, 1)) * sp


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
             use_beta_sigmoid_in_kernel):
    K = q.shape[-1]
    q, k, v = q.float(), k.float(), v.float()
    if use_gate_in_kernel:
        if A_log is None:
            raise KDAError("naive KDA: use_gate_in_kernel=True needs A_log")
        g = kda_gate(g, A_log, dt_bias, K)
    g = g.float()
    beta = beta.float()
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    scale = K ** -0.5 if scale is None else scale
    return q * scale, k, v, g, beta


def _split(cu_seqlens, B, T, state_indices):
    """(batch index, start, end, state index) per sequence; state index -1 means "skip"."""
    if cu_seqlens is None:
        segs = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise KDAError(f"naive KDA: with cu_seqlens the batch size must be 1, got {B}")
        cu = cu_seqlens.tolist()
        segs = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    idx = list(range(len(segs))) if state_indices is None else state_indices.tolist()
    return [(b, s, e, i) for (b, s, e), i in zip(segs, idx)]


def _run(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, state_indices):
    """Drive `step(q, k, v, g, beta, S) -> (o, S)` over the sequences; handle the state pool."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for b, bos, eos, n in _split(cu_seqlens, B, T, state_indices):
        if n < 0:  # padding entry of a batch: skip, touch nothing
            finals.append(torch.zeros(H, K, V, dtype=torch.float32, device=q.device))
            continue
        S = (initial_state[n].float().clone() if initial_state is not None
             else torch.zeros(H, K, V, dtype=torch.float32, device=q.device))
        if eos > bos:
            o[b, bos:eos], S = step(q[b, bos:eos], k[b, bos:eos], v[b, bos:eos], g[b, bos:eos],
                                    beta[b, bos:eos], S)
        if state_indices is not None:
            initial_state[n] = S.to(initial_state.dtype)
        finals.append(S)
    final = torch.stack(finals) if (output_final_state and state_indices is None) else None
    return o, final


def _recurrent_one(q, k, v, g, beta, S):
    """The token step for one sequence. q, k, g [L, H, K]; v [L, H, V]; beta [L, H]; S [H, K, V]."""
    o = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    for t in range(q.shape[0]):
        S = S * torch.exp(g[t])[..., None]
        u = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", S, k[t]))
        S = S + k[t][..., None] * u[:, None, :]
        o[t] = torch.einsum("hkv,hk->hv", S, q[t])
    return o, S


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                        A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False, state_indices=None):
    """Token-by-token KDA in fp32. Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 | None).

    With `state_indices` [N], `initial_state` is a state pool [S, H, K, V]: sequence n starts from
    slot state_indices[n] and its final state is written back there in place (final_state is None);
    a negative index skips the sequence (its output stays zero, no slot is touched)."""
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                A_log, dt_bias, use_beta_sigmoid_in_kernel)
    o, final = _run(_recurrent_one, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens,
                    state_indices)
    return o.to(out_dtype), final


def _chunk_one(q, k, v, g, beta, S, C):
    """Chunked KDA for one sequence. q, k, g [T, H, K]; v [T, H, V]; beta [T, H]; S [H, K, V] fp32."""
    T, H, K = q.shape
    pad = (-T) % C
    if pad:
        # Zero keys, values and betas, and zero log-decay, leave the state untouched: exact padding.
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, 0, 0, pad))
    n = q.shape[0] // C
    # [n, H, C, *]
    q, k, v, g = (x.view(n, C, H, -1).transpose(1, 2) for x in (q, k, v, g))
    beta = beta.view(n, C, H).transpose(1, 2)
    G = g.cumsum(-2)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = lower.clone().fill_diagonal_(False)
    eye = torch.eye(C, dtype=torch.float32, device=q.device)
    out = []
    for i in range(n):
        qi, ki, vi, Gi, bi = q[i], k[i], v[i], G[i], beta[i]
        # decay[h, r, j, d] = exp(G_r - G_j) for j <= r (formed from the difference: never overflows)
        diff = (Gi[:, :, None, :] - Gi[:, None, :, :]).masked_fill(~lower[None, :, :, None], float("-inf"))
        decay = diff.exp()
        Aqk = torch.einsum("hrd,hjd,hrjd->hrj", qi, ki, decay)
        Akk = torch.einsum("hrd,hjd,hrjd->hrj", ki, ki, decay) * bi[:, :, None]
        Akk = Akk.masked_fill(~strict, 0.0)
        # UT transform: M = (I + Akk)^-1, unit lower triangular
        M = torch.linalg.solve_triangular(eye + Akk, eye.expand(H, C, C), upper=False, unitriangular=True)
        W = M @ (bi[..., None] * Gi.exp() * ki)
        U = M @ (bi[..., None] * vi)
        Vn = U - W @ S
        out.append((qi * Gi.exp()) @ S + Aqk @ Vn)
        Glast = Gi[:, -1:, :]  # [H, 1, K]
        S = Glast.exp().transpose(1, 2) * S + (ki * (Glast - Gi).exp()).transpose(1, 2) @ Vn
    o = torch.stack(out).transpose(1, 2).reshape(n * C, H, -1)[:T]
    return o, S


def naive_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                    A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False, state_indices=None,
                    chunk_size=64):
    """Chunkwise-parallel KDA (spec section 4.2) in fp32 torch; same contract as `naive_recurrent_kda`."""
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                A_log, dt_bias, use_beta_sigmoid_in_kernel)
    o, final = _run(lambda *a: _chunk_one(*a, chunk_size), q, k, v, g, beta, initial_state,
                    output_final_state, cu_seqlens, state_indices)
    return o.to(out_dtype), final
