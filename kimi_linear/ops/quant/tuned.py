"""Tuned tile overrides for the FP8 decode kernels, read from the JSON file that `benchmarks/fp8_tiles.py`
writes for a GPU (`KIMI_LINEAR_FP8_TILES=path`), as vLLM reads its tuned fused-MoE configs.

Layout: {"fp8_gemm": {"<N>x<K>": [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages]} (entries for M <= 16),
"moe_direct_fp8": {"up": [block_n, block_k, num_warps, num_stages], "down": [...]}}. Without the variable
(or for shapes it does not list) the kernels' own defaults apply; a file that cannot be read or has the
wrong layout is an error naming the file and the entry, at the first kernel call that consults it."""

from __future__ import annotations

import functools
import json
import os

from kimi_linear.errors import QuantError

ENV = "KIMI_LINEAR_FP8_TILES"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise QuantError(f"{ENV}={path}: cannot read the tuned tiles: {e}") from None
    if not isinstance(data, dict):
        raise QuantError(f"{ENV}={path}: expected a JSON object, got {type(data).__name__}")
    for kind, want in (("fp8_gemm", 5), ("moe_direct_fp8", 4)):
        for key, tiles in (data.get(kind) or {}).items():
            if not (isinstance(tiles, list) and len(tiles) == want and all(isinstance(t, int) and t > 0 for t in tiles)):
                raise QuantError(f"{ENV}={path}: {kind}[{key!r}] must be a list of {want} positive integers, got {tiles!r}")
    return data


def tuned_tiles(kind: str, key: str) -> tuple[int, ...] | None:
    """The tuned tiles of `kind` ("fp8_gemm", "moe_direct_fp8") for `key`, or None."""
    path = os.environ.get(ENV)
    if not path:
        return None
    tiles = (_load(path).get(kind) or {}).get(key)
    return tuple(tiles) if tiles is not None else None
