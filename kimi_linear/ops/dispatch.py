"""Device dispatch of the ops: which implementation, Triton kernel or naive torch, runs on a tensor.

Each op package's public entry (`ops.kda.chunk_kda`, `ops.mla.mla_decode`, ...) asks this module and
calls the kernel or the naive reference with the same arguments:
- CUDA tensors run the Triton kernels, CPU tensors the naive ops;
- under Triton's interpreter (TRITON_INTERPRET=1) with KIMI_LINEAR_TRITON_ON_CPU=1 the kernels run on
  CPU tensors too, so CI can check the model's kernel path end to end at tiny shapes (the interpreter's
  own bugs are patched by the tests, `tests/triton_interpreter.py`, never by the package);
- kernels without a backward (`use_kernel`) run only when autograd does not need their inputs, and
  not under autocast: they are inference kernels for a model in one dtype, while autocast means fp32
  master weights beside bf16 activations (evaluation during training), which the naive forms promote.

Both checks read tensor attributes and the environment only: no host sync, negligible cost (the decode
path is captured in CUDA graphs, where they run once at capture).
"""

from __future__ import annotations

import os

import torch


def is_interpreter() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on tensor `x` run the Triton kernels (CUDA), or the naive torch ops (CPU).

    Under the interpreter, KIMI_LINEAR_TRITON_ON_CPU=1 runs the kernels on CPU tensors too (read at each
    call, so a test can switch paths)."""
    if x.is_cuda:
        return True
    return is_interpreter() and os.environ.get("KIMI_LINEAR_TRITON_ON_CPU", "0") == "1"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must see one of these tensors (grad mode on and it requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_kernel(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """`use_triton(x)`, for a kernel without a backward: only where the training forms are not needed."""
    return use_triton(x) and not training_forms(x, *tensors)


def training_forms(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether an op takes its training (differentiable) form: autograd needs x or `tensors`, or autocast
    is on for x's device (an fp32 master model run without grad under autocast, as evaluation during
    training does, mixes fp32 weights and residuals with bf16 activations: the training forms promote
    them the way the training step does, the inference kernels expect one dtype)."""
    return needs_grad(x, *tensors) or torch.is_autocast_enabled(x.device.type)
