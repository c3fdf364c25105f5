"""Cross-entropy of one chunk of logits and its gradient in place (Triton): the inner step of
`chunked.py` on a kernel device, one launch instead of ~8 eager passes over fp32 copies of the chunk.

`softmax_xent_(logits [c, V], targets int64 [c]) -> loss [c] fp32`: per row, in fp32,
lse = log(sum(exp(logits))) (online max and sum over blocks of the row), loss = lse - logits[target],
and the row is overwritten with d = softmax - onehot(target) in the logits' dtype. Each row is read
twice and written once; no fp32 copy of the chunk exists. Same arithmetic as the eager form
(`logits.float()`, `logsumexp`, `exp(l - lse)`, `-1` at the target, cast back) up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def _softmax_xent_kernel(logits, targets, loss, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    o = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        mask = v0 + o < V
        x = tl.load(base + v0 + o, mask=mask, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        scale = tl.where(new_m == float("-inf"), 0.0, tl.exp(m - new_m))
        acc = acc * scale + tl.where(mask, tl.exp(x - new_m), 0.0)
        m = new_m
    mx = tl.max(m, 0)
    total = tl.sum(acc * tl.where(m == float("-inf"), 0.0, tl.exp(m - mx)), 0)
    lse = mx + tl.log(total)
    t = tl.load(targets + row)
    xt = tl.load(base + t).to(tl.float32)
    tl.store(loss + row, lse - xt)
    for v0 in range(0, V, BLOCK):
        mask = v0 + o < V
        x = tl.load(base + v0 + o, mask=mask, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) - tl.where(v0 + o == t, 1.0, 0.0)
        tl.store(base + v0 + o, d.to(logits.dtype.element_ty), mask=mask)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [c, V] (unit last stride; overwritten with softmax - onehot), targets int [c] -> loss [c] fp32."""
    c, V = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _softmax_xent_kernel[(c,)](logits, targets.contiguous(), loss, V, logits.stride(0),
                                   BLOCK=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=8)
    return loss
