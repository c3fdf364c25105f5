"""PrefixCache: the scheduler's prefix-cache policy over the block pool and the snapshot pool (pure Python).

A hit needs two things at the same block-aligned position p: the MLA latent blocks of tokens [0, p)
(cached in the `BlockPool` by their hash chain) and a snapshot of the state slot taken right after
token p - 1 (`SnapshotPool`, keyed by the hash of the block ending at p). A model without slot layers
(`needs_state=False`) needs the blocks only.

- `lookup(request)`: the longest such p, with p < num_tokens (at least one token is computed: the
  last one gives the logits to sample from) and, for a request that wants prompt logprobs, p no
  larger than the prompt positions whose logprobs it already has. It also reports how far the blocks
  alone reach (`num_matched_tokens`): past the hit, a branch point where another sequence diverged.
- `admit(request, hit)`: the request shares the hit's blocks, its slot is restored from the pinned
  snapshot (`SchedulerOutput.restore_snapshots`), and it computes only the rest. It also gets its
  snapshot targets: the last block boundary before the end of its prompt (so that a later request with
  the same prompt, or one that extends it, hits) and the branch point (so that the next request sharing
  the same prefix hits there).
- `chunk_tokens`: a prefill chunk ends at the next snapshot target, and otherwise (when it is not the
  last chunk) at a block boundary, so that the state at each chunk end is an exact snapshot point.
- `plan_saves`: after the step's forward, the runner copies the slot of each scheduled request whose
  chunk ends on a block boundary into a fresh snapshot. A block that ends with the token still in flight
  (async scheduling: a decode scheduled before the previous step's token is read back) is keyed at
  `commit`, which runs after that token is known, so such steps overlap like any other. Targets are
  kept; other snapshots (chunk ends, block boundaries during decode) are progress snapshots: a request
  keeps only its latest one, which is what the next turn of a chat (prompt + answer + new message) or a
  resumed preempted request hits.
- `commit(plan)` (after the step): unpin the restored snapshots and index the saved ones;
  `register_blocks(request)` indexes a request's newly full, computed blocks under their hashes.

Counters (`stats`): queries and hits in tokens, as vLLM's `prefix_cache_queries` / `prefix_cache_hits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_linear.engine.block_hash import BlockHasher
from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.snapshot_pool import SnapshotPool


@dataclass(frozen=True)
class PrefixHit:
    block_ids: list[int]  # cached blocks the request shares (tokens [0, num_tokens))
    snapshot: int | None  # snapshot to restore into its slot (None: no hit, or a model without slot state)
    num_tokens: int  # cached tokens, a multiple of block_size
    num_matched_tokens: int  # tokens whose blocks are cached (>= num_tokens)


@dataclass(frozen=True)
class SnapshotSave:
    request: Request
    slot: int
    snapshot: int
    key: bytes | None  # None: the block ends with the token in flight, keyed at `commit`
    keep: bool  # a snapshot target (else a progress snapshot, superseded by the request's next one)
    num_blocks: int = 0  # the request's full blocks at the snapshot point (the block whose hash is the key)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found cached
    restores: int = 0
    saves: int = 0


@dataclass
class StepPlan:
    """What the runner does with snapshots in one step (part of `SchedulerOutput`)."""
    restores: list[tuple[int, int]] = field(default_factory=list)  # (snapshot, slot) before the forward
    saves: list[SnapshotSave] = field(default_factory=list)  # slot -> snapshot after the forward


class PrefixCache:
    def __init__(self, block_pool: BlockPool, snapshot_pool: SnapshotPool, hash_algo: str = "sha256",
                 needs_state: bool = True):
        self.block_pool = block_pool
        self.snapshot_pool = snapshot_pool
        self.block_size = block_pool.block_size
        self.hasher = BlockHasher(self.block_size, hash_algo)
        self.needs_state = needs_state
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ lookup and admission
    def lookup(self, request: Request) -> PrefixHit:
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        if request.wants_prompt_logprobs:
            max_blocks = min(max_blocks, request.num_prompt_logprobs // bs)
        hashes = self.hasher.hashes(request, max_blocks)[:max_blocks]
        blocks = self.block_pool.lookup(hashes)
        m = len(blocks)
        if not self.needs_state:
            return PrefixHit(blocks, None, m * bs, m * bs)
        for j in range(m, 0, -1):
            s = self.snapshot_pool.lookup(hashes[j - 1])
            if s is not None:
                return PrefixHit(blocks[:j], s, j * bs, m * bs)
        return PrefixHit([], None, 0, m * bs)

    def blocks_taken_from_free(self, hit: PrefixHit) -> int:
        """Hit blocks that are cached without an owner: sharing them takes them out of `num_free`."""
        return sum(1 for b in hit.block_ids if self.block_pool.ref_count(b) == 0)

    def admit(self, request: Request, hit: PrefixHit, plan: StepPlan) -> None:
        """Give `request` the hit (its slot is already allocated): shared blocks, the snapshot restore,
        `num_computed_tokens`, and its snapshot targets; count the query."""
        self.stats.queries += request.num_tokens
        self.stats.hits += hit.num_tokens
        if request.num_cached_tokens is None:
            request.num_cached_tokens = hit.num_tokens
        if hit.block_ids:
            self.block_pool.share(hit.block_ids)
        request.block_ids = list(hit.block_ids)
        request.num_computed_tokens = hit.num_tokens
        request.num_registered_blocks = len(hit.block_ids)
        if hit.snapshot is not None:
            self.snapshot_pool.pin(hit.snapshot)
            plan.restores.append((hit.snapshot, request.state_slot))
            self.stats.restores += 1
        request.snapshot_targets = self.targets(request, hit)

    def targets(self, request: Request, hit: PrefixHit) -> list[int]:
        """Snapshot targets past the hit: the last block boundary before the prompt's end, the branch point."""
        if not self.needs_state:
            return []
        bs = self.block_size
        targets = {(request.num_prompt_tokens - 1) // bs * bs}
        if hit.num_matched_tokens > hit.num_tokens:
            targets.add(hit.num_matched_tokens)
        return sorted(t for t in targets if t > hit.num_tokens)

    def chunk_tokens(self, request: Request, n: int, start: int | None = None,
                     targets: list[int] | None = None) -> int:
        """Shrink a chunk of `n` tokens from `start` (default `num_computed_tokens`) so that it ends at the
        next snapshot target (default the request's), else (not the last chunk) on a block boundary in reach."""
        start = request.num_computed_tokens if start is None else start
        end = start + n
        for t in request.snapshot_targets if targets is None else targets:
            if start < t < end:
                return t - start
        if end < request.num_tokens:
            aligned = end // self.block_size * self.block_size
            if aligned > start:
                return aligned - start
        return n

    # ------------------------------------------------------------------ snapshots of this step
    def plan_saves(self, scheduled: list[tuple[Request, int]], plan: StepPlan) -> None:
        """Snapshot every scheduled request whose chunk ends on a block boundary not yet snapshotted."""
        if not self.needs_state:
            return
        bs = self.block_size
        for req, n in scheduled:
            end = req.num_computed_tokens + n
            if end % bs or end == 0:
                continue
            if req.num_placeholders and end >= req.num_tokens:
                key = None  # its last token is in flight: hashed at commit (never hash a placeholder)
            else:
                key = self.hasher.hashes(req, end // bs)[end // bs - 1]
                if self.snapshot_pool.lookup(key) is not None:
                    continue
            sid = self.snapshot_pool.allocate()
            if sid is None:  # every snapshot is pending or pinned this step
                continue
            plan.saves.append(SnapshotSave(req, req.state_slot, sid, key, keep=end in req.snapshot_targets,
                                           num_blocks=end // bs))

    def commit(self, plan: StepPlan) -> None:
        """After the step's forward: unpin the restored snapshots and index the saved ones (the scheduler
        indexes the blocks, `register_blocks`, as each request advances)."""
        for sid, _ in plan.restores:
            self.snapshot_pool.unpin(sid)
        for save in plan.saves:
            req = save.request
            key = save.key
            if key is None:  # keyed now: the token in flight at scheduling time has been read back since
                if (req.status != RequestStatus.RUNNING or req.num_placeholders
                        or req.num_tokens < save.num_blocks * self.block_size):
                    # it finished, was aborted (its token dropped) or preempted meanwhile: as a synchronous
                    # engine would never have run this step, the copy is not kept
                    self.snapshot_pool.cancel(save.snapshot)
                    continue
                key = self.hasher.hashes(req, save.num_blocks)[save.num_blocks - 1]
            self.stats.saves += 1
            if not self.snapshot_pool.commit(save.snapshot, key) or save.keep:
                continue
            if req.progress_snapshot is not None and req.progress_snapshot != key:
                self.snapshot_pool.discard(req.progress_snapshot)
            req.progress_snapshot = key

    def register_blocks(self, request: Request) -> None:
        """Index the request's full, computed blocks that are not indexed yet."""
        full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if full <= request.num_registered_blocks:
            return
        hashes = self.hasher.hashes(request, full)
        for i in range(request.num_registered_blocks, full):
            self.block_pool.cache_block(request.block_ids[i], hashes[i])
        request.num_registered_blocks = full

    def reset(self) -> None:
        """Forget every cached block and unpinned snapshot (owned blocks stay, unindexed)."""
        self.block_pool.reset_cache()
        self.snapshot_pool.reset()
