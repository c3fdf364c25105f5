"""Block hashes of the prefix cache: one hash per full block of a sequence, chained over its parent.

The hash of block i is H(hash of block i - 1, the block's token ids, extra keys), with a fixed root
for block 0, so equal hashes mean equal token prefixes (and equal extra keys: a future LoRA /
adapter id, a cache salt). A block hash names both the MLA latent block holding those tokens and the
KDA state snapshot taken right after them (`engine/prefix_cache.py`).

Algorithms (vLLM's names): "sha256" (default; collision-resistant, so a hit can never mix two
different prefixes) and "xxhash" (xxh3_128, faster, needs the xxhash package).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

from kimi_linear.errors import ConfigError

HASH_ALGOS = ("sha256", "xxhash")
_ROOT_SEED = b"kimi_linear prefix cache root"

BlockHashFn = Callable[[bytes, Sequence[int], tuple], bytes]


def _payload(tokens: Sequence[int], extra_keys: tuple) -> tuple[bytes, bytes]:
    return array("q", tokens).tobytes(), repr(extra_keys).encode() if extra_keys else b""


def _sha256(parent: bytes, tokens: Sequence[int], extra_keys: tuple) -> bytes:
    toks, extra = _payload(tokens, extra_keys)
    h = hashlib.sha256(parent)
    h.update(toks)
    h.update(extra)
    return h.digest()


def block_hash_fn(algo: str) -> BlockHashFn:
    """The block hash function of `algo` (one of HASH_ALGOS). Raises ConfigError for an unknown or
    unavailable algorithm."""
    if algo == "sha256":
        return _sha256
    if algo == "xxhash":
        try:
            import xxhash
        except ImportError:
            raise ConfigError("prefix_caching_hash_algo", "xxhash needs the xxhash package "
                                                          "(pip install xxhash); or use sha256") from None

        def _xxh(parent: bytes, tokens: Sequence[int], extra_keys: tuple) -> bytes:
            toks, extra = _payload(tokens, extra_keys)
            h = xxhash.xxh3_128(parent)
            h.update(toks)
            h.update(extra)
            return h.digest()

        return _xxh
    raise ConfigError("prefix_caching_hash_algo", f"must be one of {', '.join(HASH_ALGOS)}, got {algo!r}")


def root_hash(algo: str) -> bytes:
    """The parent hash of a sequence's first block."""
    return block_hash_fn(algo)(b"", [], (_ROOT_SEED,))


class BlockHasher:
    """Extends a request's `block_hashes` to cover its full blocks (token ids only grow, so hashes made
    once stay valid, across preemption too)."""

    def __init__(self, block_size: int, algo: str = "sha256"):
        self.block_size = block_size
        self.algo = algo
        self._fn = block_hash_fn(algo)
        self._root = root_hash(algo)

    def hashes(self, request, num_blocks: int | None = None) -> list[bytes]:
        """The request's block hashes, extended to `num_blocks` full blocks (default: every full block)."""
        bs = self.block_size
        full = request.num_tokens // bs
        want = full if num_blocks is None else min(num_blocks, full)
        out = request.block_hashes
        extra = request.cache_extra_keys
        while len(out) < want:
            i = len(out)
            out.append(self._fn(out[-1] if out else self._root, request.token_slice(i * bs, (i + 1) * bs), extra))
        return out
