"""Fused weights for inference: a group of parameters stored as consecutive rows of one tensor.

Several projections read the same input (KDA's q | k | v | f_a | g_a | b, MLA's q | kv_a, a SwiGLU's
gate | up; the MoE's routed experts and its shared expert). A group is *tied* when its parameters are
views of consecutive rows of one contiguous tensor: the group then runs as one GEMM (one launch, one pass
over x) while parameter names, shapes, the checkpoint layout and the weight memory stay as they are (the
loader and `init_weights` copy into the views in place; nothing is stored twice).

- `materialize(model, device)`: `to_empty` for a meta-device model that allocates each declared group
  (`fused_groups()`) as one tensor from the start; `KimiLinearForCausalLM.from_config` builds this way.
- `tie(params)`: re-point the parameters at views of one new tensor, values kept (the old storage is
  freed once nothing else holds it).
- `spanning(params)`: the [rows, cols] tensor a tied group spans, or None when it is not tied (e.g. after
  `model.to(...)` gave every parameter its own storage).
- `fused_weight(owner, key, params)`: for inference (None while autograd needs the separate parameters):
  the spanning tensor, tying the group first if it is not tied; cached on `owner` by data pointers.
  None as well inside `no_fusion()` (the model's training call, with or without grad: under FSDP2 the
  parameters are views into its all-gather buffers, which a re-tie would break) and for parameters that
  are not plain tensors (DTensors). Correctness never depends on the tie: the separate parameters give
  the same results.

Rows run along the last dim: [E, 2I, D] stacked experts and an [I, D] projection tie into
[E * 2I + I, D]; [C, 1, W] conv weights into [3C, W].
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kimi_linear.layers.linear import Fp8Weight, fp8_scale_of
from kimi_linear.ops.quant import FP8

_FUSION_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("kimi_linear_fusion_off", default=False)


@contextlib.contextmanager
def no_fusion():
    """Within this block `fused_weight` returns None: layers use their separate parameters, nothing is tied."""
    token = _FUSION_OFF.set(True)
    try:
        yield
    finally:
        _FUSION_OFF.reset(token)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd must see these tensors (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rows(p: torch.Tensor) -> int:
    return p.numel() // p.shape[-1] if p.shape[-1] else 0


def spanning(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The [sum rows, cols] view spanning the tied group `params`, or None if they are not tied."""
    p0 = params[0]
    if p0.device.type == "meta" or p0.numel() == 0:
        return None
    cols = p0.shape[-1]
    storage_ptr = p0.untyped_storage().data_ptr()
    expect = p0.data_ptr()
    rows = 0
    for p in params:
        if (p.dtype != p0.dtype or p.device != p0.device or not p.is_contiguous() or p.shape[-1] != cols
                or p.data_ptr() != expect or p.untyped_storage().data_ptr() != storage_ptr):
            return None
        expect += p.numel() * p.element_size()
        rows += _rows(p)
    return p0.detach().as_strided((rows, cols), (cols, 1), p0.storage_offset())


@torch.no_grad()
def tie(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Make `params` views of consecutive rows of one new tensor (values kept); return it [rows, cols].
    None (nothing changed) when they cannot share one tensor (dtypes, devices or row sizes differ)."""
    p0 = params[0]
    cols = p0.shape[-1]
    if any(p.dtype != p0.dtype or p.device != p0.device or p.shape[-1] != cols or p.numel() == 0 for p in params):
        return None
    with torch.inference_mode(False):
        flat = torch.cat([p.detach().reshape(-1, cols) for p in params], 0)
    off = 0
    for p in params:
        n = _rows(p)
        p.data = flat[off:off + n].view(p.shape)
        off += n
    return flat


def fused_weight(owner: object, key: str, params: list[torch.Tensor]) -> torch.Tensor | Fp8Weight | None:
    """The spanning tensor of the group for an inference forward (see the module docstring), else None;
    an `Fp8Weight` for a group of FP8 weights."""
    if needs_grad(*params) or _FUSION_OFF.get() or any(type(p.data) is not torch.Tensor for p in params):
        return None
    if params[0].dtype == FP8:
        return _fused_fp8(owner, key, params)
    return _fused_plain(owner, key, params)


def _fused_fp8(owner: object, key: str, params: list[torch.Tensor]) -> Fp8Weight | None:
    scales = [fp8_scale_of(p) for p in params]
    if any(s is None for s in scales) or len({s[1] for s in scales}) != 1:
        return None
    block = scales[0][1]
    if block is not None and any(p.shape[-2] % block[0] for p in params[:-1]):
        return None  # a block of scales would straddle two members
    w = _fused_plain(owner, key, params)
    s = _fused_plain(owner, key + "/scale", [sc for sc, _ in scales]) if w is not None else None
    return Fp8Weight(w, s, block) if s is not None else None


def _fused_plain(owner: object, key: str, params: list[torch.Tensor]) -> torch.Tensor | None:
    ptrs = tuple(p.data_ptr() for p in params)
    cache = owner.__dict__.setdefault("_fused_weights", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == ptrs and hit[1].dtype == params[0].dtype:
        return hit[1]
    t = spanning(params)
    if t is None and params[0].device.type != "meta":
        t = tie(params)
        ptrs = tuple(p.data_ptr() for p in params)
    if t is not None:
        cache[key] = (ptrs, t)
    return t


def materialize(model: torch.nn.Module, device: torch.device | str) -> None:
    """Replace meta-device parameters and buffers by uninitialised storage on `device` (as `to_empty`
    does), each declared group as consecutive rows of one allocation: tied with no copy, no transient
    and no allocator fragmentation. Groups are taken parents first; a parameter already placed (the
    shared expert's gate|up inside the MoE stack) leaves its other group to follow from adjacency.
    A parameter shared by several modules (tied embeddings) stays one object."""
    placed: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for params in getattr(module, "fused_groups", dict)().values():
            p0 = params[0]
            if (any(id(p) in placed or p.device.type != "meta" for p in params)
                    or any(p.dtype != p0.dtype or p.shape[-1] != p0.shape[-1] or p.numel() == 0 for p in params)):
                continue
            flat = torch.empty(sum(_rows(p) for p in params), p0.shape[-1], dtype=p0.dtype, device=device)
            off = 0
            for p in params:
                placed[id(p)] = flat[off:off + _rows(p)].view(p.shape)
                off += _rows(p)
    swapped: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in swapped:
                t = placed.get(id(p))
                swapped[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device) if t is None else t,
                                                    requires_grad=p.requires_grad)
            module._parameters[key] = swapped[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[key] = torch.empty_like(b, device=device)


def tie_all(model: torch.nn.Module) -> int:
    """Tie every group that the model's modules declare (`fused_groups()`), parents before children (the
    MoE's [experts ; shared] stack before the shared SwiGLU's gate|up, which it keeps adjacent). Returns
    the number of groups tied now.

    On CUDA the allocator cache is emptied after each group, so the next group's tensor is a fresh
    allocation rather than a split of the storage just freed (which would leave GBs stranded in
    partly used segments at the real shape); the transient peak is one group."""
    n = 0
    for module in model.modules():
        groups = getattr(module, "fused_groups", None)
        if groups is None:
            continue
        for params in groups().values():
            if params[0].device.type != "meta" and spanning(params) is None and tie(params) is not None:
                n += 1
                if params[0].is_cuda:
                    torch.cuda.empty_cache()
    return n
