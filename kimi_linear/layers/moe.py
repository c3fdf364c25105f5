"""The MoE block (`block_sparse_moe`): sigmoid router with correction bias, routed SwiGLU experts
stacked into [E, ...] tensors, plus the shared experts.

Parameters: `gate.weight` [E, D], `gate.e_score_correction_bias` [E] (kept fp32),
`experts.w13_weight` [E, 2I, D] (checkpoint `experts.{e}.w1` rows then `w3` rows),
`experts.w2_weight` [E, D, I] (checkpoint `experts.{e}.w2`), `shared_experts.{gate,up,down}_proj`.

The ops (`ops.moe.select_experts`, `ops.moe.fused_experts`) run the fused Triton router and experts on
CUDA tensors, which never sync with the host (CUDA-graph capturable); CPU tensors, and any call that needs
autograd (the kernels have no backward), run the naive ops. Inputs are token batches [..., D], flattened
to [N, D].

Shared expert folded in (one shared expert, the real config): the routed experts and the shared expert
are tied (`layers/fused.py`) into [E + 1]-expert tensors (`w13_weight` is rows [:E] of one tensor and the
shared gate/up its last expert; likewise `w2_weight` and the shared down_proj), the router appends
expert E with weight 1.0 to every token, and one fused MoE call computes both: no separate GEMVs. The
kernel's sum then rounds once (routed + shared in fp32) where the reference (and the naive path) rounds
the routed sum and the shared output to the model dtype first: a one-ulp difference at most.
`norm_forward(norm, branch, residual)` is the decoder's post-attention `norm.add` followed by the block, with
the norm, the router's logits and its top-k in one launch for decode-sized batches
(`ops.moe.norm_select_experts`).
`forward(x, reduce=False)` may return the unreduced `(y [N, k, D], weights [N, k])` pair for the next norm
kernel to sum (`RMSNorm.add`).

Training (module in training mode):
- `tokens_per_expert` (a non-persistent fp32 buffer [E], detached): how many tokens each routed expert got
  in the most recent training-mode forward; read by the bias balance update (`e_score_correction_bias`
  moves outside autograd, by the trainer).
- Sequence-level balance loss (DeepSeek-V3's complementary sequence-wise auxiliary loss), on when
  `aux_loss_coef` > 0: per document of the packed row (`cu_seqlens`), with T its tokens, K = top-k,
  s'_t = s_t / sum_j s_t,j the unbiased sigmoid scores normalised over the experts,
  f_i = E / (K T) * #{t : i in topk(t)} and P_i = mean_t s'_t,i, the loss is coef * sum_i f_i P_i; the layer
  keeps the mean over the row's documents (`pop_aux_loss()` hands it to the model once). Gradients reach
  the router weight through P (f counts selections: no gradient), as in DeepSeek-V3.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.config import ModelConfig
from kimi_linear.layers.fused import fused_weight
from kimi_linear.layers.linear import Fp8Weight, scale_shape
from kimi_linear.layers.mlp import SwiGLUMLP
from kimi_linear.ops.moe import fused_experts, norm_select_experts, router_scores, select_experts
from kimi_linear.ops.quant import FP8


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
        self.config = config

    def forward(self, x: torch.Tensor, num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k + num_shared] fp32, ids int64), the shared slots last."""
        c = self.config
        return select_experts(x, self.weight, self.e_score_correction_bias, c.num_experts_per_token,
                              c.num_expert_group, c.topk_group, c.moe_renormalize, c.routed_scaling_factor,
                              c.moe_biased_weights, num_shared=num_shared)

    def norm_route(self, norm: nn.Module, branch: torch.Tensor, residual: torch.Tensor, num_shared: int = 0):
        """The decoder's `norm.add(branch, residual)` and this router on its output, one launch where the
        kernel serves (`ops.moe.norm_select_experts`) -> (h, residual, (weights, ids))."""
        c = self.config
        h, residual, weights, ids = norm_select_experts(
            branch, residual, norm.weight, norm.eps, self.weight, self.e_score_correction_bias,
            c.num_experts_per_token, c.num_expert_group, c.topk_group, c.moe_renormalize, c.routed_scaling_factor,
            c.moe_biased_weights, num_shared=num_shared)
        return h, residual, (weights, ids)


class Experts(nn.Module):
    """The routed experts' stacks. FP8 (`to_fp8`): float8_e4m3fn stacks with fp32 scales `w13_weight_scale`
    [E, 2I, 1] / `w2_weight_scale` [E, D, 1] per output row, or `*_weight_scale_inv` per `block`."""

    block: tuple[int, int] | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2_weight = nn.Parameter(torch.empty(E, D, I))

    @property
    def is_fp8(self) -> bool:
        return self.w13_weight.dtype == FP8

    def to_fp8(self, block: tuple[int, int] | None) -> None:
        """Replace the stacks by FP8 parameters (uninitialised, on the stacks' device) and their scales."""
        E, I2, D = self.w13_weight.shape
        dev = self.w13_weight.device
        self.block = tuple(block) if block is not None else None
        suffix = "scale" if block is None else "scale_inv"
        for name, (N, K) in (("w13_weight", (I2, D)), ("w2_weight", (D, I2 // 2))):
            setattr(self, name, nn.Parameter(torch.empty(E, N, K, dtype=FP8, device=dev), requires_grad=False))
            setattr(self, f"{name}_{suffix}", nn.Parameter(
                torch.empty(E, *scale_shape(N, K, block), dtype=torch.float32, device=dev), requires_grad=False))

    def fp8_stacks(self) -> tuple[Fp8Weight, Fp8Weight]:
        suffix = "scale" if self.block is None else "scale_inv"
        return (Fp8Weight(self.w13_weight, getattr(self, f"w13_weight_{suffix}"), self.block),
                Fp8Weight(self.w2_weight, getattr(self, f"w2_weight_{suffix}"), self.block))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.is_fp8:
            w13, w2 = self.fp8_stacks()
            return fused_experts(x, w13.weight, w2.weight, topk_weights, topk_ids, w13_scale=w13.scale,
                                 w2_scale=w2.scale, block=self.block)
        return fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts > 0 else None)
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        self.aux_loss_coef = 0.0
        self._aux_loss: torch.Tensor | None = None

    def fused_groups(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups tied for inference: [E routed ; 1 shared] expert stacks (one shared expert only)."""
        se = self.shared_experts
        if se is None or self.config.num_shared_experts != 1:
            return {}
        return {"w13": [self.experts.w13_weight, se.gate_proj.weight, se.up_proj.weight],
                "w2": [self.experts.w2_weight, se.down_proj.weight]}

    def _stacked(self):
        """(w13 [E + S, 2I, D], w2 [E + S, D, I], S): with the shared expert folded in when tied, else S = 0.
        FP8 experts give `Fp8Weight` stacks (weights and scales folded alike)."""
        groups = self.fused_groups()
        w13 = fused_weight(self, "w13", groups["w13"]) if groups else None
        w2 = fused_weight(self, "w2", groups["w2"]) if w13 is not None else None
        fp8 = self.experts.is_fp8
        if w13 is None or w2 is None or fp8 != isinstance(w13, Fp8Weight):
            if fp8:
                w13, w2 = self.experts.fp8_stacks()
                return w13, w2, 0
            return self.experts.w13_weight, self.experts.w2_weight, 0
        E, I2, D = self.experts.w13_weight.shape
        if fp8:
            return w13.view_experts(E + 1), w2.view_experts(E + 1), 1
        return w13.view(E + 1, I2, D), w2.view(E + 1, D, I2 // 2), 1

    def norm_forward(self, norm: nn.Module, branch: torch.Tensor, residual: torch.Tensor, reduce: bool = True,
                     cu_seqlens: torch.Tensor | None = None):
        """`self(norm.add(branch, residual)[0])` and the new residual, the norm folded into the router's launch
        where the kernel serves (decode). branch, residual [N, D] -> (y or the unreduced pair, residual)."""
        w13, w2, num_shared = self._stacked()
        h, residual, routing = self.gate.norm_route(norm, branch, residual, num_shared)
        return self.forward(h, reduce, cu_seqlens, routing=routing, stacks=(w13, w2, num_shared)), residual

    def forward(self, x: torch.Tensor, reduce: bool = True, cu_seqlens: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None, stacks: tuple | None = None):
        """x [..., D] -> y [..., D]; with reduce=False (x [N, D]) possibly the pair (y [N, k, D], weights [N, k]).
        cu_seqlens int32 [S + 1]: the documents of x [N, D] (for the balance loss; None = one document).
        routing / stacks: the router's (weights, ids) and `_stacked()` already computed (`norm_forward`)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w13, w2, num_shared = stacks if stacks is not None else self._stacked()
        topk_weights, topk_ids = routing if routing is not None else self.gate(x, num_shared=num_shared)
        if self.training:
            routed = topk_ids[:, :self.config.num_experts_per_token]
            flat = routed.reshape(-1)  # counted by a scatter-add: bincount would sync with the host
            self.tokens_per_expert = torch.zeros(self.config.num_experts, dtype=torch.float32, device=x.device
                                                 ).scatter_add_(0, flat, torch.ones(flat.shape, device=x.device)).detach()
            if self.aux_loss_coef > 0:
                self._aux_loss = self._balance_loss(x, routed, cu_seqlens)
        separate_shared = num_shared == 0 and self.shared_experts is not None
        if isinstance(w13, Fp8Weight):
            y = fused_experts(x, w13.weight, w2.weight, topk_weights, topk_ids, num_shared,
                              reduce=reduce or separate_shared, w13_scale=w13.scale, w2_scale=w2.scale,
                              block=w13.block)
        else:
            y = fused_experts(x, w13, w2, topk_weights, topk_ids, num_shared, reduce=reduce or separate_shared)
        if isinstance(y, tuple):  # the kernel's unreduced pair
            return y
        if separate_shared:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def _balance_loss(self, x: torch.Tensor, routed: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """coef * mean over documents of sum_i f_i P_i (see the module docstring); fp32 scalar."""
        N, K = routed.shape
        E = self.config.num_experts
        s = router_scores(x, self.gate.weight)  # [N, E] fp32
        p = s / (s.sum(-1, keepdim=True) + 1e-20)
        cu = (torch.tensor([0, N], device=x.device) if cu_seqlens is None else cu_seqlens).to(x.device, torch.int64)
        S = cu.numel() - 1
        doc = torch.searchsorted(cu[1:], torch.arange(N, device=x.device), right=True).clamp_max(S - 1)
        lengths = (cu[1:] - cu[:-1]).clamp_min(1).to(torch.float32)  # [S]
        P = torch.zeros(S, E, dtype=torch.float32, device=x.device).index_add_(0, doc, p) / lengths[:, None]
        counts = torch.zeros(S, E, dtype=torch.float32, device=x.device)
        counts.index_put_((doc[:, None].expand(N, K).reshape(-1), routed.reshape(-1)),
                          torch.ones(N * K, dtype=torch.float32, device=x.device), accumulate=True)
        f = counts * (E / K) / lengths[:, None]
        return self.aux_loss_coef * (f * P).sum(-1).mean()

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The balance loss of the last training forward (None if off), handed over once (not kept)."""
        aux, self._aux_loss = self._aux_loss, None
        return aux
