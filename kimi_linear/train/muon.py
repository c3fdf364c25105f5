"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for weight matrices; AdamW for the rest.

Written from the public descriptions (Jordan et al.'s Muon; Moonshot's "Muon is Scalable for LLM
Training", which trains Kimi / Moonlight this way). For a matrix W [m, n] with gradient G:

    M <- mu * M + G                                  (momentum buffer)
    U <- G + mu * M   (Nesterov)   or   M
    O <- NS5(U)                                      (~ U V^T of U's SVD: every singular value near 1)
    W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(m, n)) * O

NS5 normalises U by its Frobenius norm, then runs 5 steps of X <- a X + (b A + c A^2) X with A = X X^T
(the short side first) and (a, b, c) = (3.4445, -4.7750, 2.0315), in bf16. The 0.2 sqrt(max(m, n)) factor
is the paper's: an orthogonal [m, n] update has RMS 1 / sqrt(max(m, n)), so the scaled update has RMS 0.2,
about AdamW's, and the two kinds of parameter share one lr and weight decay.

Stacked parameters are batches of matrices: a 3-D [E, m, n] expert stack is E matrices, and a group's
`split` (the SwiGLU experts' w1 | w3 rows) divides each into `split` matrices along m.

Param groups with `use_muon=False` take the AdamW update (the same arithmetic as torch.optim.AdamW).
Under FSDP2 parameters are DTensors sharded on dim 0: a 3-D stack's local shard holds whole matrices and
is orthogonalised locally; a 2-D matrix is gathered, orthogonalised (identically on every rank) and its
local rows kept. Optimizer state tensors are shaped like their parameters (DTensors under FSDP2), so DCP
saves and reshards them.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
UPDATE_RMS = 0.2  # Moonshot: match AdamW's typical update RMS


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of g [..., m, n] (bf16 iterations), same shape, g's dtype."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    if not wide:
        x = x.mT
    return x.to(g.dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def orthogonal_update(u: torch.Tensor, split: int = 1, steps: int = NS_STEPS) -> torch.Tensor:
    """NS5 of a parameter-shaped update u (2-D matrix or 3-D stack), as this rank's local tensor."""
    if isinstance(u, DTensor) and u.dim() == 2:
        full = newton_schulz(u.full_tensor(), steps)
        return distribute_tensor(full, u.device_mesh, u.placements, src_data_rank=None).to_local()
    x = _local(u)
    if split > 1:
        shape = x.shape
        return newton_schulz(x.reshape(*shape[:-2], split, shape[-2] // split, shape[-1]), steps).reshape(shape)
    return newton_schulz(x, steps)


def muon_lr_scale(shape: torch.Size, split: int = 1) -> float:
    """0.2 * sqrt(max(m, n)) of one matrix of a parameter of `shape`."""
    m, n = shape[-2] // split, shape[-1]
    return UPDATE_RMS * math.sqrt(max(m, n))


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True` (optional `split`), AdamW for the others.

    Group keys: lr, weight_decay, use_muon; Muon groups: momentum, nesterov, ns_steps, split;
    AdamW groups: betas, eps."""

    def __init__(self, param_groups, lr: float = 3e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, betas=(0.9, 0.95), eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, use_muon=False, split=1)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = _local(state["momentum_buffer"])
            g = _local(p.grad)
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu) if group["nesterov"] else buf
            if isinstance(p, DTensor):
                u = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            o = orthogonal_update(u, group["split"], group["ns_steps"])
            w = _local(p)
            w.mul_(1 - lr * wd)
            w.add_(o, alpha=-lr * muon_lr_scale(p.shape, group["split"]))

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            m, v, g, w = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(p.grad), _local(p)
            w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
