"""Causal depthwise short convolution (+ SiLU) with a conv-state pool, for prefill and decode.

Public entry: `causal_conv1d`, which runs the Triton kernel (`short_conv.py`, imported on first use:
importing the package never needs triton) or the naive reference (`naive.naive_causal_conv1d`), see
`ops/dispatch.py`. The inference kernel has no backward: when autograd needs x or the weight, a pass
without a state pool (training) runs the Triton training kernels with their own backward
(`short_conv_train.causal_conv1d_train`) on a kernel device, the vectorised torch form
(`varlen.causal_conv1d_varlen`) elsewhere; one with a state pool the naive form.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.conv.naive import naive_causal_conv1d
from kimi_linear.ops.conv.varlen import causal_conv1d_varlen
from kimi_linear.ops.dispatch import training_forms, use_triton

__all__ = ["causal_conv1d", "naive_causal_conv1d", "causal_conv1d_varlen"]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None, state_indices: torch.Tensor | None = None,
                  activation: str | None = "silu", decode: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d (+ SiLU) over a varlen token batch, updating the conv-state pool in place.

    x [T, C] (the tokens of N sequences back to back, `cu_seqlens` [N + 1], None = one sequence);
    weight [C, W] or [C, 1, W]; conv_state [S, W - 1, C] pool or None; state_indices int [N] (None = slot n,
    negative = padding row: zero output, no slot touched). Returns y [T, C] in x's dtype.
    `decode`: every sequence has exactly one token and a conv_state, so the kernel path takes its one-launch
    decode kernel (the result is the same either way).
    """
    if training_forms(x, weight):
        if conv_state is None and state_indices is None:
            if use_triton(x) and weight.shape[-1] <= 4:
                from kimi_linear.ops.conv.short_conv_train import causal_conv1d_train

                return causal_conv1d_train(x, weight, cu_seqlens, activation)
            return causal_conv1d_varlen(x, weight, cu_seqlens, activation)
        return naive_causal_conv1d(x, weight, conv_state, cu_seqlens, state_indices, activation)
    if use_triton(x):
        from kimi_linear.ops.conv.short_conv import causal_conv1d as kernel

        return kernel(x, weight, conv_state, cu_seqlens, state_indices, activation, decode)
    return naive_causal_conv1d(x, weight, conv_state, cu_seqlens, state_indices, activation)
