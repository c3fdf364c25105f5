"""Optional fast FP8 paths that may be missing on a GPU / library version (a Triton build that cannot compile
an fp8 dot for a tile shape, a torch whose `_scaled_mm` lacks row-wise scaling): the first failure is logged
once as a warning and the op's exact slower path serves from then on (`fallbacks()` lists them, benchmarks
print it). Argument errors (`ValueError`, `QuantError`, `MoEError`) are never swallowed, nor anything raised
while a CUDA graph is being captured (the paths are first used eagerly, by the engine's profiling pass)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
_BROKEN: dict[str, str] = {}


def fallbacks() -> dict[str, str]:
    """{fast path: the error that disabled it} for this process."""
    return dict(_BROKEN)


def first_try(key: str, fast, slow):
    """fast() unless `key` failed before in this process; on its first failure, slow() from then on."""
    if key in _BROKEN:
        return slow()
    try:
        return fast()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - compile / launch failures of an optional path
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        _BROKEN[key] = f"{type(e).__name__}: {str(e)[:300]}"
        logger.warning("FP8 fast path %s failed (%s); using its fallback from now on", key, _BROKEN[key])
        return slow()
