"""Chunkwise-parallel KDA (prefill and training) on Triton: the public `chunk_kda` and its autograd.

Forward = `chunk_intra`'s prep kernel (per 64-token chunk: gate, cumsum, L2 norm, beta, Qg, Kd), `chunk_diag`
(per 16-token sub-chunk: its rows of Aqk and Akk, the diagonal block through an anchored matmul where its
decay span allows and exactly where not, in two launches), `chunk_intra`'s solve kernel (the UT transform,
W, U) and `chunk_scan` (the sequential state scan, fused with the output). Backward = the
reverse state scan, then `chunk_bwd_state` (per chunk: the value-dim contractions) and `chunk_bwd_intra`
(per 16-token sub-chunk: the key-dim work back to q, k, beta; then per chunk: the reverse cumsum of the
decay gradient and the gate backward to f / g, A_log, dt_bias).
In training the forward keeps what the backward needs (chunk states, V', M, G, W, U, ...), so
nothing is recomputed.

Invariants: states are fp32 [N, H, K, V] with o = S^T q; intermediates are in the input dtype
(bf16 -> bf16 matmul operands, fp32 accumulation), decays and G in fp32; no host sync (variable
length chunk indexing is built on the device unless a host copy `cu_seqlens_cpu` is given).
"""

from __future__ import annotations

import torch
import triton

from kimi_linear.errors import KDAError
from kimi_linear.ops.kda.chunk_bwd_intra import chunk_bwd_intra_launch
from kimi_linear.ops.kda.chunk_bwd_state import chunk_bwd_state_launch
from kimi_linear.ops.kda.chunk_diag import SPAN
from kimi_linear.ops.kda.chunk_intra import chunk_fwd_intra_launch
from kimi_linear.ops.kda.chunk_scan import chunk_bwd_scan_launch, chunk_fwd_scan_launch
from kimi_linear.ops.kda.chunk_utils import BT, prepare_chunks

# Default launch settings per kernel (`chunk_kda(config=...)` overrides them per call, e.g. for a
# benchmark sweep); scans: None = by shape (chunk_scan.pick_scan).
CONFIG = {
    "intra": dict(num_warps=8, num_stages=1, diag_warps=2, solve_warps=2, exact_warps=2, span=SPAN),
    "scan": dict(num_warps=4, num_stages=None, BV=None),
    "bwd_scan": dict(num_warps=4, num_stages=None, BV=None),
    "bwd_state": dict(num_warps=8, num_stages=1),
    "bwd_intra": dict(num_warps=4, num_stages=1, gate_warps=4),
}

# dtype of the chunk states (and their gradients) kept for the backward: fp32 keeps the decay
# gradient exp(G_last) * sum_v(S * dS) exact; the matmuls still take them in the compute dtype.
STATE_DTYPE = torch.float32


def _rows(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """A view whose last two dims are contiguous and whose (B, T) dims flatten to one token stride."""
    if x.stride(-1) != 1 or (x.dim() == 4 and x.stride(-2) != x.shape[-1]) or (B > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    return x


def _check(q, k, v, g, beta, initial_state, cu_seqlens, use_gate, A_log, state_indices, cu_seqlens_cpu):
    if q.dim() != 4:
        raise KDAError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise KDAError(f"k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise KDAError(f"v must be [B, T, H, V] matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    if g.shape != q.shape and tuple(g.shape) != (B, T, H * K):
        raise KDAError(f"g must be [B, T, H, K] (or [B, T, H*K]), got {tuple(g.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise KDAError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if K > 256 or v.shape[-1] > 256:
        raise KDAError(f"head dims above 256 are not supported (K={K}, V={v.shape[-1]})")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise KDAError(f"q dtype {q.dtype} not supported (bf16, fp16, fp32)")
    if use_gate and A_log is None:
        raise KDAError("use_gate_in_kernel=True needs A_log")
    if use_gate and A_log.numel() != H:
        raise KDAError(f"A_log must hold H={H} values, got {A_log.numel()}")
    if cu_seqlens is not None:
        if B != 1:
            raise KDAError(f"with cu_seqlens the batch size must be 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise KDAError("cu_seqlens must be a 1-D tensor [N + 1]")
        if cu_seqlens_cpu is not None and (int(cu_seqlens_cpu[0]) != 0 or int(cu_seqlens_cpu[-1]) != T):
            raise KDAError(f"cu_seqlens must start at 0 and end at T={T}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if state_indices is not None:
        if initial_state is None:
            raise KDAError("state_indices needs initial_state (the state pool [S, H, K, V])")
        if state_indices.numel() != N:
            raise KDAError(f"state_indices must have one entry per sequence ({N}), got {state_indices.numel()}")
    if initial_state is not None:
        V = v.shape[-1]
        if initial_state.dim() != 4 or tuple(initial_state.shape[1:]) != (H, K, V):
            raise KDAError(f"initial_state must be [N, H, K, V] = [*, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
        if state_indices is None and initial_state.shape[0] != N:
            raise KDAError(f"initial_state has {initial_state.shape[0]} states for {N} sequences")
        if not initial_state.is_contiguous():
            raise KDAError("initial_state must be contiguous")
    return B, T, H, K, N


def _launch_config(config: dict | None) -> dict:
    """CONFIG with the per-kernel settings of `config` ({kernel: {setting: value}}) over it."""
    if not config:
        return CONFIG
    unknown = set(config) - set(CONFIG)
    if unknown:
        raise KDAError(f"config: unknown kernels {sorted(unknown)}; known: {sorted(CONFIG)}")
    return {name: {**CONFIG[name], **config.get(name, {})} for name in CONFIG}


def _forward(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state, cu_seqlens,
             cu_seqlens_cpu, state_indices, use_l2, use_gate, use_sigmoid, save, config):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype if q.dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
    dev = q.device
    q, k, v = _rows(q, B, T), _rows(k, B, T), _rows(v, B, T)
    g = _rows(g.reshape(B, T, H, K), B, T)
    beta = _rows(beta, B, T)
    idx = prepare_chunks(cu_seqlens, B, T, cu_seqlens_cpu)
    TT = B * T
    NS = idx.NT if cu_seqlens is not None else B * idx.NT_seq
    bufs = dict(
        W=torch.empty(TT, H, K, device=dev, dtype=dt), U=torch.empty(TT, H, V, device=dev, dtype=dt),
        Kd=torch.empty(TT, H, K, device=dev, dtype=dt), Qg=torch.empty(TT, H, K, device=dev, dtype=dt),
        Aqk=torch.empty(TT, H, BT, device=dev, dtype=dt), gam=torch.empty(NS, H, K, device=dev, dtype=torch.float32),
        G=torch.empty(TT, H, K, device=dev, dtype=torch.float32), M=torch.empty(TT, H, BT, device=dev, dtype=dt),
        Akk=torch.empty(TT, H, BT, device=dev, dtype=torch.float32),
        rq=torch.empty(TT, H, device=dev, dtype=torch.float32), rk=torch.empty(TT, H, device=dev, dtype=torch.float32),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous(),
    )
    if save:
        bufs.update(h=torch.empty(NS, H, K, V, device=dev, dtype=STATE_DTYPE), vn=torch.empty(TT, H, V, device=dev, dtype=dt))
    A = A_log.reshape(-1).float().contiguous() if use_gate else None
    dtb = dt_bias.reshape(-1).float().contiguous() if (use_gate and dt_bias is not None) else None
    o = torch.empty(B, T, H, V, device=dev, dtype=q.dtype)
    if TT == 0:
        return o, None, bufs, idx
    chunk_fwd_intra_launch(q, k, v, g, beta, A, dtb, scale, idx, T, bufs, use_gate=use_gate, use_l2=use_l2,
                           use_sigmoid=use_sigmoid, **config["intra"])
    si = None
    final = None
    if state_indices is not None:
        si = state_indices.to(device=dev, dtype=torch.int32).contiguous()
        ht = initial_state
    elif output_final_state:
        final = torch.empty(idx.N, H, K, V, device=dev, dtype=torch.float32)
        ht = final
    else:
        ht = None
    chunk_fwd_scan_launch(bufs, o, initial_state, ht, idx, T, si, save=save, **config["scan"])
    return o, final, bufs, idx


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state, cu_seqlens,
                cu_seqlens_cpu, use_l2, use_gate, use_sigmoid, config):
        o, final, bufs, idx = _forward(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state,
                                       cu_seqlens, cu_seqlens_cpu, None, use_l2, use_gate, use_sigmoid, True, config)
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state)
        ctx.bufs, ctx.idx, ctx.config = bufs, idx, config
        ctx.flags = (scale, use_l2, use_gate, use_sigmoid)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, A_log, dt_bias, initial_state = ctx.saved_tensors
        scale, use_l2, use_gate, use_sigmoid = ctx.flags
        grads = _backward(q, k, v, g, beta, A_log, dt_bias, initial_state, do, dht, ctx.bufs, ctx.idx, scale,
                          use_l2, use_gate, use_sigmoid, ctx.config)
        ctx.bufs = None
        return (*grads, None, None, None, None, None, None, None, None)  # scale ... config


def _backward(q, k, v, g, beta, A_log, dt_bias, initial_state, do, dht, bufs, idx, scale, use_l2, use_gate,
              use_sigmoid, config):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    dt = bufs["W"].dtype
    TT = B * T
    g_shape = g.shape
    q, k, v = _rows(q, B, T), _rows(k, B, T), _rows(v, B, T)
    g = _rows(g.reshape(B, T, H, K), B, T)
    beta = _rows(beta, B, T)
    if do is None:
        do = torch.zeros(B, T, H, V, device=dev, dtype=q.dtype)
    do = _rows(do, B, T)
    NS = bufs["gam"].shape[0]
    f32 = torch.float32
    grads = dict(
        dh=torch.empty(NS, H, K, V, device=dev, dtype=STATE_DTYPE), dvn=torch.empty(TT, H, V, device=dev, dtype=dt),
        dQg=torch.empty(TT, H, K, device=dev, dtype=f32), dY=torch.empty(TT, H, K, device=dev, dtype=f32),
        dKd=torch.empty(TT, H, K, device=dev, dtype=f32), dAqk=torch.empty(TT, H, BT, device=dev, dtype=f32),
        dAkk=torch.empty(TT, H, BT, device=dev, dtype=f32), dgx=torch.empty(NS, H, K, device=dev, dtype=f32),
        dbx=torch.empty(TT, H, device=dev, dtype=f32), dgl=torch.empty(NS, 4, H, K, device=dev, dtype=f32),
    )
    dh0 = torch.empty(idx.N, H, K, V, device=dev, dtype=f32) if initial_state is not None else None
    dq = torch.empty(B, T, H, K, device=dev, dtype=q.dtype)
    dk = torch.empty(B, T, H, K, device=dev, dtype=k.dtype)
    dv = torch.empty(B, T, H, V, device=dev, dtype=v.dtype)
    df = torch.empty(B, T, H, K, device=dev, dtype=g.dtype)
    dbeta = torch.empty(B, T, H, device=dev, dtype=beta.dtype)
    outs = dict(dq=dq, dk=dk, df=df, dbeta=dbeta)
    if use_gate:
        outs.update(dA_part=torch.zeros(NS, H, triton.cdiv(K, 32), device=dev, dtype=f32),
                    ddt_part=torch.zeros(NS, H, K, device=dev, dtype=f32))
    if TT > 0:
        dht_c = dht.contiguous() if dht is not None else None
        chunk_bwd_scan_launch(bufs, do, dht_c, grads["dh"], grads["dvn"], dh0, idx, T, **config["bwd_scan"])
        chunk_bwd_state_launch(bufs, do, v, beta, dv, grads, idx, T, use_sigmoid=use_sigmoid, **config["bwd_state"])
        A = A_log.reshape(-1).float().contiguous() if use_gate else None
        dtb = dt_bias.reshape(-1).float().contiguous() if (use_gate and dt_bias is not None) else None
        chunk_bwd_intra_launch(q, k, g, beta, A, dtb, scale, bufs, grads, outs, idx, T, use_gate=use_gate,
                               use_l2=use_l2, use_sigmoid=use_sigmoid, **config["bwd_intra"])
    elif dh0 is not None and dht is not None:
        dh0.copy_(dht)
    dA_log = ddt = None
    if use_gate:
        dA_log = outs["dA_part"].sum((0, 2)).reshape(A_log.shape).to(A_log.dtype)
        if dt_bias is not None:
            ddt = outs["ddt_part"].sum(0).reshape(dt_bias.shape).to(dt_bias.dtype)
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    return dq, dk, dv, df.reshape(g_shape), dbeta, dA_log, ddt, dh0


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
              A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
              use_beta_sigmoid_in_kernel: bool = False, state_indices: torch.Tensor | None = None,
              cu_seqlens_cpu: torch.Tensor | None = None, config: dict | None = None):
    """Chunkwise KDA. Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 | None).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log decay (<= 0), or with `use_gate_in_kernel`
    the raw gate input f, g = -exp(A_log[h]) * softplus(f + dt_bias) (A_log: H values, dt_bias [H * K]);
    beta: [B, T, H] (logits with `use_beta_sigmoid_in_kernel`); scale defaults to K ** -0.5.
    Variable length: B = 1 and `cu_seqlens` int32 [N + 1] from 0 to T (optionally its host copy
    `cu_seqlens_cpu`, which sizes the grids exactly). `initial_state` [N, H, K, V]. With
    `state_indices` [N] int32, `initial_state` is a state pool [S, H, K, V]: sequence n starts from slot
    state_indices[n] and its final state is written back there in place (final_state is None); a
    negative index skips the sequence (zero output, no slot touched). Differentiable in q, k, v, g,
    beta, A_log, dt_bias and initial_state (not with a state pool). `config` {kernel: {setting: value}}
    overrides the launch settings of `CONFIG` for this call (a benchmark's sweep); the results are the same.
    """
    B, T, H, K, N = _check(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, state_indices,
                           cu_seqlens_cpu)
    scale = K ** -0.5 if scale is None else float(scale)
    use_gate = bool(use_gate_in_kernel)
    config = _launch_config(config)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, A_log, dt_bias, initial_state))
    if needs_grad:
        if state_indices is not None:
            raise KDAError("chunk_kda with a state pool (state_indices) is inference-only; "
                                "pass initial_state per sequence to differentiate")
        return ChunkKDAFunction.apply(q, k, v, g, beta, A_log if use_gate else None, dt_bias if use_gate else None,
                                      initial_state, scale, output_final_state, cu_seqlens, cu_seqlens_cpu,
                                      bool(use_qk_l2norm_in_kernel), use_gate, bool(use_beta_sigmoid_in_kernel),
                                      config)
    o, final, _, _ = _forward(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state,
                              cu_seqlens, cu_seqlens_cpu, state_indices, bool(use_qk_l2norm_in_kernel), use_gate,
                              bool(use_beta_sigmoid_in_kernel), False, config)
    return o, final
