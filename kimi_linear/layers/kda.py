"""Kimi Delta Attention layer (spec section 3), over a flat batch described by a ForwardContext.

x -> q/k/v projections -> causal short conv + SiLU (conv state in the cache slot) -> per-channel
forget gate g = -exp(A_log) softplus(f_b(f_a(x)) + dt_bias), beta = sigmoid(b_proj(x)) -> L2-normed
q, k -> delta-rule recurrence (chunked for prefill, fused recurrent for decode; recurrent state in
the cache slot) -> gated RMSNorm with sigmoid(g_b(g_a(x))) -> o_proj.

Parameter names equal the checkpoint's (`self_attn.q_proj.weight`, `self_attn.A_log`, ...).

`GatedDeltaNet` ("gdn" layers) is the same layer with a scalar forget gate per head (gated delta net):
f_b_proj gives H values and dt_bias holds H, g = -exp(A_log) softplus(f_b(f_a(x)) + dt_bias) is
broadcast over each head's K channels and the same KDA ops run (their per-channel gate is then
constant within a head); the cache slot is KDA's.
On CUDA the Triton kernels run; on the CPU the naive ops with the same call signatures.
For inference (no autograd) the projections of x run as one GEMM over their tied rows and f_b / g_b as
one batched GEMM (`layers/fused.py`); q|k|v, f, beta and the gate are views of those outputs (no copies);
a decode step's conv is one launch (`decode=True`) and the gated norm one kernel.
A mixed batch runs per run of rows (`ForwardContext.row_runs`): its decode rows take the decode conv and
the fused recurrent kernel (the kernels of a pure decode step), its prefill rows the chunked
kernel; the projections, the gate and the output norm stay one call over the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.config import ModelConfig
from kimi_linear.layers.cache_spec import SlotCacheSpec, TensorSpec
from kimi_linear.layers.fused import fused_weight, needs_grad
from kimi_linear.layers.linear import Fp8Weight, linear
from kimi_linear.ops import kda as kda_ops
from kimi_linear.ops.conv import causal_conv1d
from kimi_linear.ops.norm import fused_gated_rms_norm

if TYPE_CHECKING:
    from kimi_linear.models.context import ForwardContext


class ShortConv(nn.Module):
    """Holds one depthwise conv weight [C, 1, W] under the checkpoint's name (`q_conv1d.weight`)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))


class KimiDeltaAttention(nn.Module):
    per_head_gate = False  # GatedDeltaNet: one forget-gate value per head

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, K = config.hidden_size, config.kda_num_heads, config.kda_head_dim
        C = H * K
        G = H if self.per_head_gate else C  # forget-gate values per token
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = H, K
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(D, C, bias=False)
        self.k_proj = nn.Linear(D, C, bias=False)
        self.v_proj = nn.Linear(D, C, bias=False)
        self.q_conv1d = ShortConv(C, config.conv_kernel_size)
        self.k_conv1d = ShortConv(C, config.conv_kernel_size)
        self.v_conv1d = ShortConv(C, config.conv_kernel_size)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(G, dtype=torch.float32))
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, G, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, C, bias=False)
        self.o_norm = _GatedNormWeight(K)
        self.o_proj = nn.Linear(C, D, bias=False)

    @staticmethod
    def cache_spec(config: ModelConfig, dtype: torch.dtype) -> SlotCacheSpec:
        """One sequence's state slot: the recurrent state [H, K, V] fp32 (o = S^T q) and the conv window
        [W - 1, 3 * H * K] in `dtype` (the last W - 1 pre-conv q|k|v inputs, oldest first)."""
        H, K = config.kda_num_heads, config.kda_head_dim
        return SlotCacheSpec((TensorSpec("recurrent", (H, K, K), torch.float32),
                              TensorSpec("conv", (config.conv_kernel_size - 1, 3 * H * K), dtype)))

    def conv_weight(self) -> torch.Tensor:
        """The three conv weights as one [3C, W] tensor (q | k | v channels).

        Cached while the weights are unchanged (same storage and version), so a decode step does not
        re-concatenate them; under autograd the concatenation is redone so gradients flow."""
        ws = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return torch.cat(ws, 0).squeeze(1)
        key = tuple((w.data_ptr(), w._version) for w in ws)
        cached = getattr(self, "_conv_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.cat([w.detach() for w in ws], 0).squeeze(1))
            self._conv_weight_cache = cached
        return cached[1]

    def fused_groups(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups tied for inference (`layers/fused.py`): the six projections of x, the two
        low-rank up-projections (one batched GEMM; KDA only, GDN's differ in size), the three conv weights."""
        groups = {"in": [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.f_a_proj.weight,
                         self.g_a_proj.weight, self.b_proj.weight],
                  "fg": [self.f_b_proj.weight, self.g_b_proj.weight],
                  "conv": [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]}
        if self.per_head_gate:
            del groups["fg"]
        return groups

    def _projections(self, x: torch.Tensor):
        """x [N, D] -> (qkv [N, 3C] pre-conv, f [N, G] gate input, beta logits [N, H], gate [N, C], conv weight [3C, W]).

        Inference: one GEMM over the tied [q; k; v; f_a; g_a; b] rows, one batched GEMM for f_b and g_b,
        the outputs used as views (no copies). Under autograd: one GEMM over the six weights concatenated
        for this call (the parameters stay separate), then f_b and g_b."""
        N = x.shape[0]
        H, K = self.num_heads, self.head_dim
        C = H * K
        groups = self.fused_groups()
        w_in = fused_weight(self, "in", groups["in"])
        w_fg = fused_weight(self, "fg", groups["fg"]) if w_in is not None and "fg" in groups else None
        w_conv = fused_weight(self, "conv", groups["conv"]) if w_in is not None else None
        if needs_grad(x, *groups["in"]):
            # training: one GEMM over the six weights concatenated (each read through `.weight`, so LoRA's
            # parametrized weights take part); the outputs are views (the conv reads q|k|v in place)
            proj = F.linear(x, torch.cat(groups["in"], 0))  # [N, 3C + 2K + H]
            qkv, fa, ga, b = proj.split([3 * C, K, K, H], dim=-1)
            return qkv, self.f_b_proj(fa), b, self.g_b_proj(ga), self.conv_weight()
        if w_in is None or w_conv is None or (w_fg is None and not self.per_head_gate):
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            return (qkv, self.f_b_proj(self.f_a_proj(x)), self.b_proj(x), self.g_b_proj(self.g_a_proj(x)),
                    self.conv_weight())
        proj = linear(x, w_in)  # [N, 3C + 2K + H]
        qkv, fg_in, b = proj.split([3 * C, 2 * K, H], dim=-1)
        if w_fg is None or isinstance(w_fg, Fp8Weight):  # GDN: f_b and g_b differ in size; FP8: two GEMMs
            return qkv, self.f_b_proj(fg_in[:, :K]), b, self.g_b_proj(fg_in[:, K:]), w_conv
        fg = torch.bmm(fg_in.view(N, 2, K).transpose(0, 1), w_fg.view(2, C, K).transpose(1, 2))  # [2, N, C]
        return qkv, fg[0], b, fg[1], w_conv

    def _gate(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate input [1, N, H, K], dt_bias [H * K]) for the KDA ops: GDN's per-head values broadcast over K."""
        N, H, K = f.shape[0], self.num_heads, self.head_dim
        if not self.per_head_gate:
            return f.reshape(1, N, H, K), self.dt_bias
        return (f[:, :, None].expand(N, H, K).reshape(1, N, H, K).contiguous(),
                self.dt_bias[:, None].expand(H, K).reshape(H * K))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        N = x.shape[0]
        H, K = self.num_heads, self.head_dim
        C = H * K
        qkv, f, b, gate, w_conv = self._projections(x)
        g, dt_bias = self._gate(f)
        beta = b.reshape(1, N, H)
        runs = [(0, N, ctx)] if ctx.is_decode or ctx.cache is None else ctx.row_runs()
        if len(runs) == 1:
            o = self._mix(qkv, g, beta, dt_bias, w_conv, ctx)
        else:  # a mixed batch: decode rows through the decode kernels, prefill rows chunked
            o = torch.cat([self._mix(qkv[t0:t1], g[:, t0:t1], beta[:, t0:t1], dt_bias, w_conv, sub)
                           for t0, t1, sub in runs], dim=1)

        o, gate = o.view(N, H, K), gate.view(N, H, K)
        o = fused_gated_rms_norm(o, gate, self.o_norm.weight, self.eps)
        return self.o_proj(o.reshape(N, C))

    def _mix(self, qkv, g, beta, dt_bias, w_conv, ctx: ForwardContext) -> torch.Tensor:
        """Short conv + delta rule over the rows of `ctx` (one kind): qkv [T, 3C] pre-conv, g [1, T, H, K]
        gate input, beta [1, T, H] logits -> o [1, T, H, K]. Decode rows (`ctx.is_decode`) take the
        one-launch decode conv and the fused recurrent kernel, anything else the chunked kernel."""
        T = qkv.shape[0]
        H, K = self.num_heads, self.head_dim
        C = H * K
        cache = ctx.cache
        recurrent, conv_state = cache.tensors[self.layer_idx] if cache is not None else (None, None)
        state_indices = ctx.state_indices if cache is not None else None
        decode = ctx.is_decode and recurrent is not None

        qkv = causal_conv1d(qkv, w_conv, conv_state, ctx.cu_seqlens, state_indices, activation="silu",
                            decode=decode and conv_state is not None)
        kwargs = dict(initial_state=recurrent, output_final_state=False, use_qk_l2norm_in_kernel=True,
                      use_gate_in_kernel=True, A_log=self.A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                      state_indices=state_indices)
        if decode:  # one token per row (padding rows too, state index -1): T sequences of one token, so the
            # kernel reads no cu_seqlens before its loads (one dependent memory latency less per launch)
            q, k, v = (t.reshape(T, 1, H, K) for t in qkv.split(C, dim=-1))
            o, _ = kda_ops.fused_recurrent_kda(q, k, v, g.reshape(T, 1, H, K), beta.reshape(T, 1, H), **kwargs)
            return o.view(1, T, H, K)
        q, k, v = (t.reshape(1, T, H, K) for t in qkv.split(C, dim=-1))
        o, _ = kda_ops.chunk_kda(q, k, v, g, beta, cu_seqlens=ctx.cu_seqlens, **kwargs)
        return o


class GatedDeltaNet(KimiDeltaAttention):
    """A "gdn" layer: KDA with one forget-gate value per head (f_b_proj [H, K], dt_bias [H]); see the module doc."""

    per_head_gate = True


class _GatedNormWeight(nn.Module):
    """`o_norm.weight` [K], shared by all heads."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
