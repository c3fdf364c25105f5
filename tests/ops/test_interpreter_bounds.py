"""The interpreter's bounds check (`tests/triton_interpreter.py`: `bounds_check`): a lane that addresses memory
outside every tensor argument fails the test on the CPU, where the GPU would read or corrupt another tensor
or fault with an illegal memory access; masked-off lanes may point anywhere."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.dispatch import is_interpreter

pytestmark = pytest.mark.skipif(not is_interpreter(), reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shifted_copy(x, y, n, shift, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = (o + shift) < n
        if MASKED:
            v = tl.load(x + o + shift, mask=m, other=0.0)
        else:
            v = tl.load(x + o + shift)
        tl.store(y + o, v, mask=o < n)

    return shifted_copy


def test_an_unmasked_lane_past_the_end_fails():
    kernel = _kernels()
    x, y = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    with pytest.raises(Exception, match="OutOfBoundsAccess.*shifted_copy.*load"):
        kernel[(1,)](x, y, 16, 4, MASKED=False, BLOCK=16)


def test_masked_lanes_may_point_anywhere():
    kernel = _kernels()
    x, y = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    kernel[(1,)](x, y, 16, 4, MASKED=True, BLOCK=16)
    assert torch.equal(y, torch.cat([torch.arange(4, 16, dtype=torch.float32), torch.zeros(4)]))
