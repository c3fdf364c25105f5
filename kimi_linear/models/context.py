"""The batch metadata of one forward pass, built by whoever drives the model (runner or SequenceCache).

The model always sees a flat batch: the new tokens of N sequences back to back (`cu_seqlens`).
Sequence n has `context_lens[n]` tokens already in the cache and `query_lens[n]` new ones.

- `cache` (a `ModelCache`, or None for a cache-less pass) holds each layer's tensors; a layer reads its
  own, `cache.tensors[layer_idx]`.
- Layers with a slot cache (KDA) read and write the state slot `state_indices[n]` (a negative index =
  padding, skip).
- Layers with a paged cache (MLA) write each new token's entry to `slot_mapping[t]` and attend over the
  sequence's `seq_lens[n]` = context + query tokens, found through `block_tables[n]`.

`is_decode` means every sequence has exactly one new token and a cache: the decode kernels apply
(fused recurrent KDA, absorbed MLA) and the step can be captured in a CUDA graph, so that path reads
device tensors only (never the host lists).

A mixed batch (not `is_decode`, with a cache) is cut by `row_runs()` into contiguous runs of rows of
one kind, from the host `query_lens`: decode rows (one new token, read from the cached state) and
prefill rows; each run is a sub-context over its rows and tokens (`rows(lo, hi)`), so the token mixers
run the decode kernels on the decode rows and the prefill kernels on the others, in the same forward,
and a decode row takes the kernels it takes in a pure decode step. The scheduler puts the
decodes first, so an engine step is two runs (three when a new request's one-token chunk follows).
`split_decodes=False` keeps the whole batch one prefill run (the path before the split: the reference
of the tests and of `benchmarks/mixed_latency.py`).

`extras` is scratch that a decode kernel may keep across steps under its own key (`ops/mla/decode.py`:
"mla_decode_ws"); the CUDA-graph runner hands each batch size its own dict (`engine/cuda_graph.py`).

Layers never import this module at run time (it belongs to the model): they use the attributes above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kimi_linear.models.cache import ModelCache


@dataclass
class ForwardContext:
    cu_seqlens: torch.Tensor  # int32 [N + 1], on the model's device
    query_lens: list[int]  # host copy of the per-sequence new-token counts
    context_lens: list[int]  # host: tokens cached before this step, per sequence
    is_decode: bool = False
    cache: ModelCache | None = None
    state_indices: torch.Tensor | None = None  # int32 [N]
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]
    block_tables: torch.Tensor | None = None  # int32 [N, max_blocks]
    seq_lens: torch.Tensor | None = None  # int32 [N], context + query
    max_seq_len: int = 0
    extras: dict = field(default_factory=dict)  # decode kernels' scratch, kept across steps (split-KV buffers)
    split_decodes: bool = True  # mixed batches: decode rows take the decode kernels (`row_runs`)
    _runs: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @staticmethod
    def for_prefill(query_lens: list[int], device: torch.device | str) -> "ForwardContext":
        """A cache-less context: each sequence is processed from scratch and nothing is stored."""
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        return ForwardContext(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                              query_lens=list(query_lens), context_lens=[0] * len(query_lens),
                              max_seq_len=max(query_lens, default=0))

    def rows(self, lo: int, hi: int) -> "ForwardContext":
        """The sub-context of rows lo .. hi - 1 and their tokens (views where the layout allows; the cache and
        `extras` are shared). Reads the host lists: never on the captured decode path."""
        t0 = sum(self.query_lens[:lo])
        t1 = t0 + sum(self.query_lens[lo:hi])
        cu = self.cu_seqlens[lo:hi + 1]
        q, c = self.query_lens[lo:hi], self.context_lens[lo:hi]

        def part(t, a, b):
            return None if t is None else t[a:b]

        return ForwardContext(
            cu_seqlens=cu if t0 == 0 else cu - t0, query_lens=q, context_lens=c,
            is_decode=self.cache is not None and all(n == 1 for n in q), cache=self.cache,
            state_indices=part(self.state_indices, lo, hi), slot_mapping=part(self.slot_mapping, t0, t1),
            block_tables=part(self.block_tables, lo, hi), seq_lens=part(self.seq_lens, lo, hi),
            max_seq_len=max((a + b for a, b in zip(q, c)), default=0), extras=self.extras,
            split_decodes=self.split_decodes)

    def row_runs(self) -> list[tuple[int, int, "ForwardContext"]]:
        """The batch as contiguous runs of decode rows and prefill rows: [(first token, end token, sub-context)].

        One run (this context itself) for a pure decode or pure prefill batch, a cache-less pass, or
        `split_decodes=False`; otherwise a run per change of kind (a sub-context's `is_decode` tells which
        kernels it takes). Computed once per context, from the host lists."""
        if self._runs is None:
            q = self.query_lens
            kinds = [n == 1 for n in q]
            if self.is_decode or self.cache is None or not self.split_decodes or len(set(kinds)) < 2:
                self._runs = [(0, sum(q), self)]
            else:
                runs, lo, t = [], 0, 0
                for i in range(1, len(q) + 1):
                    if i == len(q) or kinds[i] != kinds[lo]:
                        n = sum(q[lo:i])
                        runs.append((t, t + n, self.rows(lo, i)))
                        lo, t = i, t + n
                self._runs = runs
        return self._runs
