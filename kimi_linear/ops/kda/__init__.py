"""Kimi Delta Attention ops.

Public entries (each runs the Triton kernel or the naive reference, `ops/dispatch.py`), one signature:
- `chunk_kda`: chunkwise-parallel, prefill and training (`chunk.py`, with autograd / `naive.naive_chunk_kda`);
- `fused_recurrent_kda`: token-recurrent, the decode step, CUDA-graph safe on the kernel path
  (`fused_recurrent.py` / `naive.naive_recurrent_kda`).
`kda_gate` and the `naive_*` forms are the references. The kernels are imported on first use: importing
the package never needs triton.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.dispatch import use_triton
from kimi_linear.ops.kda.naive import kda_gate, naive_chunk_kda, naive_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate", "naive_chunk_kda", "naive_recurrent_kda"]


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
              A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
              use_beta_sigmoid_in_kernel: bool = False, state_indices: torch.Tensor | None = None,
              cu_seqlens_cpu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise KDA. Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 | None).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log decay, or the raw gate input with
    `use_gate_in_kernel` (A_log: H values, dt_bias [H * K]); beta: [B, T, H] (logits with
    `use_beta_sigmoid_in_kernel`); cu_seqlens int32 [N + 1] with B = 1; with `state_indices` [N],
    `initial_state` is a state pool [S, H, K, V] updated in place (negative index: sequence skipped).
    `cu_seqlens_cpu` (a host copy of cu_seqlens) lets the kernel size its grids exactly. Both paths are
    differentiable (not with a state pool).
    """
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
            use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, state_indices)
    if use_triton(q):
        from kimi_linear.ops.kda.chunk import chunk_kda as kernel

        return kernel(*args, cu_seqlens_cpu)
    return naive_chunk_kda(*args)


def fused_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
                        A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                        use_beta_sigmoid_in_kernel: bool = False, state_indices: torch.Tensor | None = None,
                        **launch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-recurrent KDA (the decode step); same contract as `chunk_kda`, no autograd on the kernel path.

    `launch` goes to the kernel only: `out` (an output buffer [B, T, H, V]), `block_v`, `num_warps`.
    """
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
            use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, state_indices)
    if use_triton(q):
        from kimi_linear.ops.kda.fused_recurrent import fused_recurrent_kda as kernel

        return kernel(*args, **launch)
    o, final = naive_recurrent_kda(*args)
    out = launch.get("out")
    if out is not None:
        out.copy_(o)
        o = out
    return o, final
