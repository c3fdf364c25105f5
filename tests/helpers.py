"""Test helpers: relative-error comparison with clear messages, HF oracle checkpoint builders."""

from __future__ import annotations

import torch


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp64 (0 when both are zero)."""
    ref, got = ref.double(), got.double()
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result ({int(torch.isnan(got).sum())} values)"
    assert not torch.isnan(ref).any(), f"{name}: NaN in the reference"
    e = rel_err(ref, got)
    m = (got.double() - ref.double()).abs().max().item()
    assert e <= tol, f"{name}: relative error {e:.3e} > {tol:.1e} (max abs diff {m:.3e})"
