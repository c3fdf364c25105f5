"""Test-side fixes for Triton's CPU interpreter; `tests/conftest.py` applies them before any test runs.

CI runs every kernel on the CPU under Triton 3.x's interpreter (TRITON_INTERPRET=1), which has bugs that
compiled kernels do not. `apply()` fixes them by patching private interpreter internals, in interpreter
mode only. The package never imports this module: importing kimi_linear leaves Triton untouched
(tests/ops/test_dispatch.py checks that in a fresh process). A script that runs kernels under the
interpreter outside pytest applies it itself (`sys.path` holding tests/, then
`import triton_interpreter; triton_interpreter.apply()`).

The fixes:
- `tl.dot` of bf16 operands multiplies their raw uint16 bit patterns: upcast them to fp32 first;
- fp32 -> bf16 casts truncate (and its round-to-nearest mode drops the carry): round half to even,
  as the GPU does, so that bf16 errors measured on the CPU are the kernels', not the interpreter's;
  likewise casts to float8_e4m3fn (round half to even, saturating at +-448, as torch and the GPU do);
- a kernel scalar is a 1-element numpy array and numpy 2.x refuses `int()` of it, which breaks
  `range(start, end)` loops whose bounds are computed in the kernel: read the single element;
- nested jit calls re-patch triton.language each time: skip that while a kernel is running;
- (Triton >= 3.9) masks computed from loaded scalars may be int32: masked loads / stores need bool.

And one check the GPU makes only by crashing (or not at all): every active lane of a load or store must
address bytes inside the storage of one of the kernel's tensor arguments (`bounds_check`; on unless
KIMI_LINEAR_INTERPRETER_BOUNDS=0). The interpreter itself reads and writes any address, so an unmasked
lane past a tensor's end passes silently on the CPU, while on the GPU it reads another tensor's bytes,
corrupts them, or faults with "an illegal memory access".
"""

from __future__ import annotations

import os

# (module path, class or None, attribute) of everything `apply()` replaces
PATCHED = [
    ("triton.runtime.interpreter", "InterpreterBuilder", "create_dot"),
    ("triton.runtime.interpreter", "InterpreterBuilder", "cast_impl"),
    ("triton.runtime.interpreter", "InterpreterBuilder", "create_fp_to_fp"),
    ("triton.runtime.interpreter", "InterpreterBuilder", "create_masked_load"),
    ("triton.runtime.interpreter", "InterpreterBuilder", "create_masked_store"),
    ("triton.runtime.interpreter", None, "_patch_lang_tensor"),
    ("triton.runtime.interpreter", None, "_patch_lang"),
    ("triton.runtime.interpreter", "GridExecutor", "_init_args_hst"),
]


def is_applied() -> bool:
    """Whether this process's interpreter carries the patches."""
    try:
        from triton.runtime import interpreter
    except Exception:
        return False
    return getattr(interpreter.InterpreterBuilder.create_dot, "_kimi_linear_patched", False)


def apply() -> None:
    """Patch Triton's interpreter in this process (idempotent); nothing happens unless TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
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

    import numpy as np

    def to_bf16_rne(src, dst_type):
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return interpreter.TensorHandle(bits.astype(np.uint16).reshape(np.shape(src.data)), dst_type.scalar)

    def to_fp8_rne(src, dst_type):
        import torch

        data = np.ascontiguousarray(src.data)
        if src.dtype.scalar == tl.bfloat16:  # stored as its uint16 bit pattern
            data = (data.astype(np.uint32) << 16).view(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.float8_e4m3fn)
        return interpreter.TensorHandle(t.view(torch.uint8).numpy().reshape(np.shape(src.data)), dst_type.scalar)

    def fp8_rne(src, dst_type) -> bool:
        return (dst_type.scalar == tl.float8e4nv
                and src.dtype.scalar in (tl.float32, tl.bfloat16, tl.float16))

    cast_impl = builder.cast_impl

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16_rne(src, dst_type)
        if fp8_rne(src, dst_type):
            return to_fp8_rne(src, dst_type)
        return cast_impl(self, src, dst_type)

    builder.cast_impl = patched_cast
    fp_to_fp = builder.create_fp_to_fp

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16_rne(src, dst_type)
        if fp8_rne(src, dst_type):
            return to_fp8_rne(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = patched_fp_to_fp  # (create_fp_trunc already goes through cast_impl)

    # Triton >= 3.9: a comparison with a loaded scalar can come out as an int32 "mask", which the
    # interpreter's masked load / store then reject ("mask has unsupported dtype"): masks are predicates.
    def bool_mask(mask):
        if mask is not None and getattr(mask.data, "dtype", np.bool_) != np.bool_:
            return interpreter.TensorHandle(mask.data.astype(np.bool_), tl.int1)
        return mask

    masked_load = builder.create_masked_load

    def patched_masked_load(self, ptrs, mask, *args, **kwargs):
        return masked_load(self, ptrs, bool_mask(mask), *args, **kwargs)

    builder.create_masked_load = patched_masked_load
    masked_store = builder.create_masked_store

    def patched_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return masked_store(self, ptrs, value, bool_mask(mask), *args, **kwargs)

    builder.create_masked_store = patched_masked_store

    if os.environ.get("KIMI_LINEAR_INTERPRETER_BOUNDS", "1") != "0":
        bounds_check(interpreter, np)

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patched_lang_tensor(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched_lang_tensor

    # Every nested @triton.jit call re-patches triton.language (~1.5 ms each); while a kernel runs the
    # language is already patched, so skip the redundant work (same semantics, ~3x faster tests).
    patch_lang = interpreter._patch_lang
    patched_modules: set[int] = set()
    depth = [0]

    class _Scope:
        def __init__(self, scope, top):
            self.scope, self.top = scope, top

        def restore(self):
            if self.top:
                patched_modules.clear()
                depth[0] = 0
            if self.scope is not None:
                self.scope.restore()

    def fast_patch_lang(fn):
        mods = {id(m) for m in fn.__globals__.values() if m is tl or m is tl.core}
        top = depth[0] == 0
        if not top and mods <= patched_modules:
            return _Scope(None, False)
        scope = patch_lang(fn)
        patched_modules.update(mods)
        depth[0] = 1
        return _Scope(scope, top)

    interpreter._patch_lang = fast_patch_lang


class OutOfBoundsAccess(IndexError):
    """A kernel lane addressed memory outside all of its tensor arguments' storages."""


def bounds_check(interpreter, np) -> None:
    """Make every masked load / store of a launched kernel check its active lanes' addresses against the
    storages of the launch's tensor arguments (raises OutOfBoundsAccess naming the kernel)."""
    import torch

    state = {"kernel": None, "ranges": None}
    init_args = interpreter.GridExecutor._init_args_hst

    def storages(arg, out):
        if isinstance(arg, (tuple, list)):
            for a in arg:
                storages(a, out)
        elif isinstance(arg, torch.Tensor):
            st = arg.untyped_storage()
            out.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        elif hasattr(arg, "base") and isinstance(getattr(arg, "base"), torch.Tensor):  # a TensorDescriptor
            storages(arg.base, out)

    def patched_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges: list = []
        storages(list(args_hst) + list(kwargs_hst.values()), ranges)
        ranges = sorted(set(ranges))
        starts = np.array([lo for lo, _ in ranges], dtype=np.uint64)
        # end of the furthest-reaching storage starting at or before each start (storages may overlap)
        ends = np.maximum.accumulate(np.array([hi for _, hi in ranges], dtype=np.uint64)) if ranges else starts
        state["kernel"] = getattr(self.fn, "__name__", "?")
        state["ranges"] = (ranges, starts, ends)
        return args_hst, kwargs_hst

    interpreter.GridExecutor._init_args_hst = patched_init_args

    def check(ptrs, mask, what):
        if state["ranges"] is None:
            return
        ranges, starts, ends = state["ranges"]
        p = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            p = p[np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)]
        if p.size == 0:
            return
        size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        q = p.reshape(-1)
        if not ranges:
            ok = np.zeros(q.shape, dtype=bool)
        else:
            i = np.searchsorted(starts, q, side="right").astype(np.int64) - 1
            ok = (i >= 0) & (q + size <= ends[np.maximum(i, 0)])
        if not ok.all():
            bad = q[~ok]
            near = min(ranges, key=lambda r: min(abs(int(bad[0]) - r[0]), abs(int(bad[0]) - r[1])))
            raise OutOfBoundsAccess(
                f"{state['kernel']}: {bad.size} of {q.size} active lanes of a masked {what} address memory outside "
                f"every tensor argument (first at byte {int(bad[0]) - near[0]:+d} from the storage "
                f"[0, {near[1] - near[0]}) nearest to it)")

    builder = interpreter.InterpreterBuilder
    masked_load = builder.create_masked_load
    masked_store = builder.create_masked_store

    def checked_load(self, ptrs, mask, *args, **kwargs):
        check(ptrs, mask, "load")
        return masked_load(self, ptrs, mask, *args, **kwargs)

    def checked_store(self, ptrs, value, mask, *args, **kwargs):
        check(ptrs, mask, "store")
        return masked_store(self, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load = checked_load
    builder.create_masked_store = checked_store
