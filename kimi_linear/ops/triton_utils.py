"""Small helpers shared by the Triton kernels (interpreter support, device queries).

Triton 3.x's CPU interpreter (TRITON_INTERPRET=1) multiplies bf16 operands of `tl.dot` as their raw
uint16 bit patterns, giving garbage. `patch_triton_interpreter()` upcasts bf16 dot operands to fp32
in interpreter mode only; compiled kernels are untouched. CI runs every kernel under the interpreter.
"""

from __future__ import annotations

import functools
import os


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def patch_triton_interpreter() -> None:
    if not is_interpreter():
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # triton missing: nothing to patch
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_kimi_linear_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._kimi_linear_patched = True
    builder.create_dot = create_dot


def use_triton(x) -> bool:
    """Whether ops on tensor `x` run the Triton kernels (CUDA), or the naive torch ops (CPU).

    Under the interpreter, KIMI_LINEAR_TRITON_ON_CPU=1 runs the kernels on CPU tensors too, so CI can
    check the model's kernel path end to end at tiny shapes.
    """
    if x.is_cuda:
        return True
    return is_interpreter() and os.environ.get("KIMI_LINEAR_TRITON_ON_CPU", "0") == "1"
