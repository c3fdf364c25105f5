"""Dense SwiGLU MLP (layer 0's `mlp` and the MoE's `shared_experts`): down(silu(gate(x)) * up(x)).

For inference gate_proj and up_proj run as one GEMM over their tied rows (`layers/fused.py`; FP8 projections
(`layers/linear.py`) tie their scales alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.layers.fused import fused_weight, needs_grad
from kimi_linear.layers.linear import linear


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def fused_groups(self) -> dict[str, list[torch.Tensor]]:
        """Parameter groups tied for inference (`layers/fused.py`): gate and up."""
        return {"gate_up": [self.gate_proj.weight, self.up_proj.weight]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fused_weight(self, "gate_up", self.fused_groups()["gate_up"])
        if w is None or needs_grad(x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = linear(x, w).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
