"""Checkpoint I/O in the Hugging Face layout: sharded safetensors plus model.safetensors.index.json.

Loading streams the shards named by the index (never by glob order), one tensor at a time, straight
onto the parameters' device and dtype (safetensors reads onto that device), so the weights are never
held twice. Every problem is a CheckpointError naming the tensor (missing, unexpected, wrong shape,
NaN / inf values: a model with them would serve garbage as if fine) or the file (missing, truncated,
corrupt).

Saving writes official tensor names (experts unstacked) in the model dtype, except A_log and dt_bias
which stay fp32, with shards of at most `max_shard_bytes`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from kimi_linear.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _safe_open(path: str, device: str = "cpu"):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device=device)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing", file=path) from None
    except Exception as e:  # SafetensorError for truncated / corrupt headers
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}", file=path) from None


def checkpoint_shards(path: str) -> "OrderedDict[str, list[str]]":
    """shard file -> tensor names, in the index's order (or the single model.safetensors)."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}", file=index) from None
        shards: OrderedDict[str, list[str]] = OrderedDict()
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return OrderedDict({SINGLE_NAME: list(f.keys())})
    raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {path}", file=path)


def check_finite(t: torch.Tensor, name: str, file: str) -> None:
    """Raise CheckpointError if the floating-point tensor `t` holds NaN or inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"tensor {name} in {file} has {bad} non-finite values (NaN or inf) of {t.numel()}",
                              tensor=name, file=file)


@torch.no_grad()
def load_weights(model, path: str | os.PathLike, progress: bool = True, plan=None) -> None:
    """Fill `model`'s parameters from the checkpoint folder `path` (strict: every tensor must match).
    `plan`: a `loader.quant.QuantLoadPlan` for FP8 models (scales, on-load quantization, dequantized pairs)."""
    path = os.fspath(path)
    layout = model.checkpoint_layout()
    params = dict(model.named_parameters())
    shards = checkpoint_shards(path)
    expected_names = set(layout) if plan is None else plan.expected_names(layout)
    seen: set[str] = set()
    device = next(iter(params.values())).device
    read_device = "cpu" if device.type == "meta" else str(device)
    total = sum(len(v) for v in shards.values())
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    try:
        for shard, names in shards.items():
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise CheckpointError(f"checkpoint file {file} (listed in the index) is missing", file=file)
            with _safe_open(file, read_device) as f:
                available = set(f.keys())
                for raw_name in names:
                    if raw_name not in available:
                        raise CheckpointError(f"tensor {raw_name} is listed in the index but absent from {file}",
                                              tensor=raw_name, file=file)
                    name = model.canonical_tensor_name(raw_name, model.config)
                    if plan is not None and plan.consumes(name):
                        done = plan.take(name, _read(f, raw_name, file), params, layout, file)
                        if done:
                            seen.add(done)
                        bar.update(1)
                        continue
                    if name not in layout:
                        raise CheckpointError(f"unexpected tensor {raw_name} in {file}: the model has no such "
                                              f"parameter", tensor=raw_name, file=file)
                    pname, index, shape = layout[name]
                    sl = f.get_slice(raw_name)
                    got = tuple(sl.get_shape())
                    if got != shape and not (plan is not None and plan.accepts_shape(name, got, shape)):
                        raise CheckpointError(f"tensor {raw_name} has shape {list(got)}, expected {list(shape)}",
                                              tensor=raw_name, file=file)
                    t = _read(f, raw_name, file)
                    dst = params[pname].data
                    if plan is not None:
                        t, extra = plan.convert(name, t, dst, index, shape, params, pname, file)
                        if extra:
                            seen.add(extra)
                    else:
                        check_finite(t, raw_name, file)
                    if t is not None:
                        (dst[index] if index is not None else dst).copy_(t)
                    seen.add(name)
                    bar.update(1)
    finally:
        bar.close()
    if plan is not None:
        plan.finish()
    missing = sorted(expected_names - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more} in checkpoint {path}", tensor=missing[0])


def _read(f, raw_name: str, file: str) -> torch.Tensor:
    try:
        return f.get_tensor(raw_name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {raw_name} from {file} (truncated or corrupt "
                              f"file?): {e}", tensor=raw_name, file=file) from None


def iter_checkpoint_tensors(model, dtype: torch.dtype | None = None, materialize=None):
    """(official name, tensor) pairs in parameter order, on the CPU, in the checkpoint dtypes.

    `materialize(param_name, param) -> tensor` supplies each parameter's value (default: the
    parameter itself); it is called once per parameter, so a meta-device model can be streamed.
    """
    params = dict(model.named_parameters())
    dtype = dtype or getattr(model, "dtype", None)
    current: tuple[str, torch.Tensor] | None = None
    for name, (pname, index, _shape) in model.checkpoint_layout().items():
        if current is None or current[0] != pname:
            value = params[pname].detach() if materialize is None else materialize(pname, params[pname])
            current = (pname, value)
        t = current[1]
        t = t[index] if index is not None else t
        if name.endswith((".A_log", ".dt_bias")):
            t = t.float()
        elif dtype is not None:
            t = t.to(dtype)
        yield name, t.contiguous().cpu()


def save_checkpoint(model, path: str | os.PathLike, max_shard_bytes: int = 2 * 1024 ** 3,
                    dtype: torch.dtype | None = None, progress: bool = True, materialize=None) -> None:
    """Write sharded safetensors + index.json with official names (A_log / dt_bias fp32).

    Shards are written as they fill, so at most one shard is held in memory."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    layout = model.checkpoint_layout()
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    written: list[tuple[str, list[str]]] = []  # temporary file name, tensor names

    def flush():
        nonlocal shard, size
        tmp = f"model-part-{len(written) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, size = {}, 0

    bar = tqdm(total=len(layout), desc="Writing weights", unit="tensor", disable=not progress, leave=False)
    for name, t in iter_checkpoint_tensors(model, dtype, materialize):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
        bar.update(1)
    if shard:
        flush()
    bar.close()
    name_shards(path, written, total)


def name_shards(path: str, written: list[tuple[str, list[str]]], total: int) -> None:
    """Rename the temporary shard files `written` [(file, tensor names)] in `path` to
    model-0000i-of-0000n.safetensors and write the index (total_size `total` bytes)."""
    n = len(written)
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, fname))
        weight_map.update({k: fname for k in names})
    with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
