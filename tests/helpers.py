"""Test helpers: relative-error comparison with clear messages, HF oracle checkpoint builders, importing a
benchmark module."""

from __future__ import annotations

import importlib
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_benchmark(name: str):
    """`benchmarks.NAME`, imported as `python -m benchmarks.NAME` does (the repository root on sys.path)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


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


def fp8_experts(E, D, I, block, device):
    """Random expert stacks (w13 [E, 2I, D], w2 [E, D, I]) quantized per expert to FP8: (q13, s13, q2, s2)."""
    from kimi_linear.ops.quant import quantize_fp8

    w13 = torch.randn(E, 2 * I, D, device=device) / D**0.5
    w2 = torch.randn(E, D, I, device=device) / I**0.5
    q13, s13 = zip(*(quantize_fp8(w13[e], block) for e in range(E)))
    q2, s2 = zip(*(quantize_fp8(w2[e], block) for e in range(E)))
    return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)
