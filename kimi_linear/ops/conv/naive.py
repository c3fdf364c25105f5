"""Reference causal depthwise conv1d + SiLU over variable-length sequences, with conv state.

x [T, C] holds the tokens of all sequences back to back (`cu_seqlens` [N + 1]; None = one sequence).
weight [C, W]: column W - 1 multiplies the current token, column 0 the token W - 1 steps back.
conv_state [S, W - 1, C]: a pool of per-sequence windows of the last W - 1 *pre-conv* inputs (oldest
first); `state_indices` [N] picks each sequence's slot (a negative index marks a padding row: its output is
zero and no slot is touched). The inputs before a sequence start come from its state (zeros when
conv_state is None). The window is updated in place after the call.
Math in fp32, output in x's dtype, state stored in the pool's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.errors import ConvError


def naive_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None,
                        cu_seqlens: torch.Tensor | None = None, state_indices: torch.Tensor | None = None,
                        activation: str | None = "silu") -> torch.Tensor:
    T, C = x.shape
    W = weight.shape[-1]
    w = weight.reshape(C, W).float()
    cu = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    idx = list(range(len(cu) - 1)) if state_indices is None else state_indices.tolist()
    y = torch.empty(T, C, dtype=x.dtype, device=x.device)
    for n in range(len(cu) - 1):
        bos, eos = cu[n], cu[n + 1]
        if idx[n] < 0:
            y[bos:eos] = 0
            continue
        if conv_state is not None:
            prev = conv_state[idx[n]].float()
        else:
            prev = torch.zeros(W - 1, C, dtype=torch.float32, device=x.device)
        xx = torch.cat([prev, x[bos:eos].float()], dim=0)  # [W - 1 + L, C]
        L = eos - bos
        out = torch.zeros(L, C, dtype=torch.float32, device=x.device)
        for j in range(W):
            out += w[:, j] * xx[j:j + L]
        if activation == "silu":
            out = F.silu(out)
        elif activation is not None:
            raise ConvError(f"naive_causal_conv1d: unsupported activation {activation!r}")
        y[bos:eos] = out.to(x.dtype)
        if conv_state is not None:
            conv_state[idx[n]] = xx[xx.shape[0] - (W - 1):].to(conv_state.dtype)
    return y
