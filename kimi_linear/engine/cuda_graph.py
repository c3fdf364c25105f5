"""DecodeRunner: decode steps on static, bucket-padded buffers, replayed as CUDA graphs when captured.

A decode batch of N sequences (one new token each) is padded to the smallest bucket B >= N
(1, 2, 4, 8, then steps of 16, and the largest batch). The step's host inputs go into one pinned,
packed int64 [4, max_batch] buffer (input_ids, state_indices, slot_mapping, seq_lens) sent with a
single asynchronous copy; the captured region unpacks it, gathers the block tables by state slot
from the persistent `BlockTable`, runs the model and the lm_head. Padding rows carry state_indices = -1 (KDA kernels
and the short conv skip them), slot_mapping = -1 (no latent write) and seq_lens = 0 (MLA decode
reads nothing and returns zeros); their logits are dropped.

The same code runs eagerly (CPU, `enforce_eager=True`, or a bucket without a graph), so CI checks
the padding logic without a GPU. Graphs are captured largest bucket first, sharing one memory pool;
the logits of one replay must be consumed before the next replay (the engine samples at once).

`extras` contract for decode kernels (`ForwardContext.extras`): one dict per bucket, empty at first and
the same object at its warm-up, its capture and every replay. A kernel may keep scratch in it under its
own key, allocated on first use (the eager warm-up before capture) and reused while shapes match
(`ops/mla/decode.py` keeps its split-KV buffers there). One dict per bucket, not one shared dict: a
captured graph holds no reference to the tensors it reads, so a bucket's scratch must stay alive in
its own dict. On this path `ctx.max_seq_len` is the static bound (max_model_len); kernels size grids
from it or from tensor shapes, never from values read back from the device.

The cache is the model's `ModelCache`, used as is: its tensors never move, so the graphs may hold them.
"""

from __future__ import annotations

import logging
import time

import torch

from kimi_linear.engine.block_table import BlockTable
from kimi_linear.models import ForwardContext, ModelCache

logger = logging.getLogger(__name__)

ROW_INPUT_IDS, ROW_STATE, ROW_SLOT, ROW_SEQ_LEN = range(4)
PAD_VALUES = (0, -1, -1, 0)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured graph: 1, 2, 4, 8, 16, 32, ..., and max_batch itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeRunner:
    def __init__(self, model, cache: ModelCache, block_table: BlockTable, max_batch: int, max_seq_len: int,
                 device: torch.device):
        self.model = model
        self.cache = cache
        self.block_table = block_table
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = device
        self.buckets = decode_buckets(max_batch)
        pin = device.type == "cuda"
        self.host = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self.packed = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        self.state_indices = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.extras: dict[int, dict] = {B: {} for B in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._copied = torch.cuda.Event() if pin else None
        self.num_eager = 0

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise RuntimeError(f"decode batch of {n} exceeds the largest bucket {self.max_batch}")

    # ------------------------------------------------------------------ the step itself
    def load(self, input_ids: list[int], state_indices: list[int], slot_mapping: list[int],
             seq_lens: list[int]) -> int:
        """Copy one step's inputs into the static buffers, padded to its bucket. Returns the bucket."""
        n = len(input_ids)
        B = self.bucket_for(n)
        pad = B - n
        rows = [input_ids, state_indices, slot_mapping, seq_lens]
        staged = torch.tensor([r + [v] * pad for r, v in zip(rows, PAD_VALUES)], dtype=torch.int64)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        self.host[:, :B].copy_(staged)
        # the whole (contiguous, few KB) buffer in one async copy; columns past B are never read
        self.packed.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return B

    def forward(self, B: int, context_lens: list[int] | None = None) -> torch.Tensor:
        """The captured region: static buffers [:, :B] -> logits [B, vocab]. Reads device tensors only."""
        p = self.packed[:, :B]
        self.state_indices[:B].copy_(p[ROW_STATE])
        self.seq_lens[:B].copy_(p[ROW_SEQ_LEN])
        state_indices = self.state_indices[:B]
        ctx = ForwardContext(
            cu_seqlens=self.cu_seqlens[:B + 1], query_lens=[1] * B,
            context_lens=context_lens if context_lens is not None else [0] * B,  # unused on this path
            is_decode=True, cache=self.cache, state_indices=state_indices, slot_mapping=p[ROW_SLOT],
            block_tables=self.block_table.rows(state_indices), seq_lens=self.seq_lens[:B],
            max_seq_len=self.max_seq_len, extras=self.extras[B])
        hidden = self.model.forward_flat(p[ROW_INPUT_IDS], ctx)
        return self.model.compute_logits(hidden)

    def run(self, input_ids: list[int], state_indices: list[int], slot_mapping: list[int], seq_lens: list[int],
            use_graph: bool = True, patch=None) -> torch.Tensor:
        """Logits [N, vocab] of a decode batch of N sequences (graph replay when one is captured). `patch`
        (async scheduling): a function that overwrites rows of the device input ids [B] (tokens sampled by
        the step still in flight), stream-ordered after the upload of the host inputs."""
        n = len(input_ids)
        B = self.load(input_ids, state_indices, slot_mapping, seq_lens)
        if patch is not None:
            patch(self.packed[ROW_INPUT_IDS])
        if use_graph and B in self.graphs:
            self.graphs[B].replay()
            self.num_replays += 1
            return self.graph_logits[B][:n]
        self.num_eager += 1
        context_lens = [s - 1 for s in seq_lens] + [0] * (B - n)
        return self.forward(B, context_lens)[:n]

    # ------------------------------------------------------------------ capture
    def capture(self, max_batch: int | None = None) -> None:
        """Capture one graph per bucket up to `max_batch`, largest first, in one shared memory pool."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        mem0 = torch.cuda.memory_allocated(self.device)
        for B in reversed([b for b in self.buckets if max_batch is None or b <= max_batch]):
            self._load_padding(B)
            try:
                self.forward(B)  # warm-up: Triton compilation / autotuning, lazy scratch in `extras`
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.forward(B)
            except Exception as e:
                raise RuntimeError(
                    f"CUDA graph capture of the decode step failed at batch size {B}: {e}. An op on the decode "
                    f"path syncs with the host or is not capturable; run with enforce_eager=True to skip graphs."
                ) from e
            self.graphs[B] = graph
            self.graph_logits[B] = logits
        torch.cuda.synchronize(self.device)
        self.graph_bytes = torch.cuda.memory_allocated(self.device) - mem0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s, %.2f GiB", len(self.graphs),
                    sorted(self.graphs), time.perf_counter() - t0, self.graph_bytes / 1024 ** 3)

    def _load_padding(self, B: int) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        self.host[:, :B] = torch.tensor(PAD_VALUES, dtype=torch.int64)[:, None]
        self.packed.copy_(self.host)

    def release(self) -> None:
        self.graphs.clear()
        self.graph_logits.clear()
        self.extras.clear()
