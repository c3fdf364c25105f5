"""FP8 linear layers: `Fp8Linear` (a quantized `nn.Linear`) and the weight objects the GEMM entry takes.

An FP8 projection keeps the checkpoint's names: `weight` [N, K] float8_e4m3fn and its fp32 scale,
`weight_scale` [N, 1] per output channel (compressed-tensors; a per-tensor checkpoint scale is stored
repeated per channel), or `weight_scale_inv` [ceil(N / BN), ceil(K / BK)] per BN x BK block (the
DeepSeek-V3 / Kimi K2 layout; the factor the fp8 values are multiplied by, despite the name). Its forward
is `ops.quant.fp8_linear` (FP8 GEMM on CUDA, the dequantized GEMM on the CPU). Inference only: the
parameters never require grad.

`Fp8Weight(weight, scale, block)` is what a tied group of FP8 projections yields (`layers/fused.py`:
weights and scales concatenated row-wise the same way), and `linear(x, w)` runs either a plain weight
tensor or an `Fp8Weight`. `bind_fp8(model)` records on each FP8 weight parameter where its scale lives
(the owning module and attribute), so that the fused views can find the scales of a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.ops.quant import FP8, fp8_linear

SCALE_NAMES = ("weight_scale", "weight_scale_inv")


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight [N, K] (or an expert stack [E, N, K]) with its fp32 scale and block shape (None =
    per output channel)."""
    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None

    def view_experts(self, E: int) -> "Fp8Weight":
        """The [rows, cols] spanning tensors of a tied expert group as [E, rows / E, ...] stacks."""
        return Fp8Weight(self.weight.view(E, -1, self.weight.shape[-1]),
                         self.scale.view(E, -1, self.scale.shape[-1]), self.block)


def linear(x: torch.Tensor, w: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """x [..., K] @ w^T for a plain weight [N, K] or an `Fp8Weight`."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w.weight, w.scale, w.block)
    return F.linear(x, w)


def scale_shape(out_features: int, in_features: int, block: tuple[int, int] | None) -> tuple[int, int]:
    if block is None:
        return (out_features, 1)
    return (-(-out_features // block[0]), -(-in_features // block[1]))


class Fp8Linear(nn.Module):
    """y = x @ (weight * scale)^T: an `nn.Linear` (no bias) with float8_e4m3fn weights (see module doc)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = tuple(block) if block is not None else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        scale = nn.Parameter(torch.empty(scale_shape(out_features, in_features, self.block), dtype=torch.float32,
                                         device=device), requires_grad=False)
        setattr(self, self.scale_name, scale)

    @property
    def scale_name(self) -> str:
        return "weight_scale" if self.block is None else "weight_scale_inv"

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self, self.scale_name)

    def fp8_weight(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale, self.block)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.block is None else f"block {self.block[0]}x{self.block[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 {kind}"


def bind_fp8(model: nn.Module) -> None:
    """Record on every FP8 weight parameter (`_fp8_scale`) the (module, scale attribute, block) of its scale:
    Fp8Linear weights and FP8 expert stacks (`w13_weight` / `w2_weight` with `<name>_scale[_inv]`)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dtype != FP8:
                continue
            for attr in (f"{name}_scale", f"{name}_scale_inv"):
                if hasattr(module, attr):
                    p._fp8_scale = (module, attr, getattr(module, "block", None))
                    break


def fp8_scale_of(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None] | None:
    """(scale tensor, block) of an FP8 weight parameter bound by `bind_fp8`, else None."""
    ref = p.__dict__.get("_fp8_scale")
    if ref is None:
        return None
    module, attr, block = ref
    return getattr(module, attr), block
