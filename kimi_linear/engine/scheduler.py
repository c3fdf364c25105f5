"""Scheduler: which requests run this step and how many tokens each computes (pure Python, no torch).

Each `schedule()` returns {request: num_tokens} under the token budget `max_num_batched_tokens`:
first the running requests that decode (1 token), then running requests still prefilling (a chunk
of their remaining tokens), then waiting requests, oldest first. There are no phases: a prefill
is "some tokens", so chunked prefill and mixed prefill/decode batches fall out of the budget.

Admission needs both pools: a KDA state slot (`StatePool`) and MLA blocks for the scheduled chunk
(`BlockPool`), and fewer than `max_num_seqs` running requests. A running request that needs a new
block when none is free preempts the newest running request (recompute: its blocks and slot are
freed, it returns to the front of the waiting queue with its generated tokens kept); if it is
itself the newest, it preempts itself. Nothing is admitted in a step that preempted. A request
alone in the pool that still cannot grow has reached the cache's capacity and finishes with
"length", so the loop never spins; `add_request` rejects a prompt that can never fit.

With a `PrefixCache` (prefix caching on): a waiting request is admitted from its longest cached
prefix (shared blocks plus a state snapshot restored into its slot, `SchedulerOutput.snapshots`), and
only the rest counts against the budget and the pools; prefill chunks end at the request's snapshot
targets and on block boundaries; after the forward the runner snapshots the slots whose chunk ended
on a block boundary, and `update_from_output` indexes the new snapshots and the newly full blocks.
Freed blocks stay cached until evicted (`BlockPool`), so preemption and abort never leak: a request
holds its blocks and slot only while RUNNING, and snapshots are pinned or pending only within a step.

`update_from_output()` closes the loop: it advances `num_computed_tokens`, appends sampled tokens,
decides the token-id stops (`Request.check_stop`: EOS, stop ids, min_tokens, max_tokens, max_model_len)
and frees finished requests. It is two halves, which async scheduling runs apart: `advance` (at launch:
counts, snapshots, blocks, a placeholder per sampled token) and `resolve_token` (once the token is read
back: its value and the stop rules). A request whose in-flight token ends it by length is not scheduled.
Stop strings are found later, on the output side, which finishes the request through `finish` (the engine).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.prefix_cache import PrefixCache, StepPlan
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.state_pool import StatePool
from kimi_linear.errors import ValidationError

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """One step: `scheduled` in batch order (decodes first) as (request, num_tokens)."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    reset_slots: list[int] = field(default_factory=list)  # slots handed out this step: zero before use
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step
    finished: list[Request] = field(default_factory=list)  # finished while scheduling (cache capacity)
    snapshots: StepPlan = field(default_factory=StepPlan)  # prefix cache: restores before, saves after the forward

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {r.request_id: n for r, n in self.scheduled}

    @property
    def total_num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def is_decode(self) -> bool:
        """Every scheduled request computes exactly one token (the CUDA-graph path)."""
        return bool(self.scheduled) and all(n == 1 for _, n in self.scheduled)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_chunked_prefills: int = 0  # prefill chunks that did not reach the end of their tokens
    num_mixed_steps: int = 0  # steps with both decodes and prefill chunks
    max_running: int = 0


class Scheduler:
    def __init__(self, block_pool: BlockPool, state_pool: StatePool, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, prefix_cache: PrefixCache | None = None):
        self.block_pool = block_pool
        self.state_pool = state_pool
        self.prefix_cache = prefix_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: newest last
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._epoch = 0

    # ------------------------------------------------------------------ queue management
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValidationError when its prompt can never fit in the cache."""
        if request.request_id in self.requests:
            raise ValidationError(f"request id {request.request_id!r} is already in use", param="request_id")
        need = self.block_pool.blocks_needed(request.num_tokens + 1)
        if need > self.block_pool.num_blocks:
            raise ValidationError(
                f"prompt of {request.num_prompt_tokens} tokens needs {need} cache blocks but the cache has "
                f"{self.block_pool.num_blocks} ({self.block_pool.token_capacity} tokens)", param="prompt")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request with "abort" and free everything it holds. Returns it, or None if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Mark `request` finished with `status` (if not already) and release its blocks and slot."""
        if request.request_id not in self.requests:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        if not request.status.is_finished:
            request.status = status
            if stop_reason is not None:
                request.stop_reason = stop_reason
        del self.requests[request.request_id]

    def _release(self, request: Request) -> None:
        if request.block_ids:
            self.block_pool.free(request.block_ids[::-1])  # last block first: cached chains evict from the tail
            request.block_ids = []
        request.num_registered_blocks = 0
        request.snapshot_targets = []
        if request.state_slot is not None:
            self.state_pool.free(request.state_slot)
            request.state_slot = None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1
        logger.debug("preempted %s", request.request_id)

    def _give_slot(self, request: Request) -> None:
        request.state_slot = self.state_pool.allocate()
        self._epoch += 1
        request.slot_epoch = self._epoch

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` blocks for its first `num_tokens` tokens, if the pool allows."""
        need = self.block_pool.blocks_needed(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if not self.block_pool.can_allocate(need):
            return False
        request.block_ids.extend(self.block_pool.allocate(need))
        return True

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        chosen: dict[str, tuple[Request, int]] = {}  # insertion order = batch order
        budget = self.max_num_batched_tokens
        bs = self.block_pool.block_size

        # running requests: decodes first, then prefill chunks, each group oldest first
        for req in sorted(self.running, key=lambda r: r.is_prefilling):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if req.num_placeholders and req.reached_length(self.max_model_len):
                continue  # its token in flight ends it by length (async scheduling): nothing left to compute
            n = min(req.num_uncomputed_tokens, budget)
            if req.is_prefilling:  # shrink the chunk to what the free blocks can hold
                fits = (len(req.block_ids) + self.block_pool.num_free) * bs - req.num_computed_tokens
                n = max(1, min(n, fits))
                if self.prefix_cache is not None:
                    n = self.prefix_cache.chunk_tokens(req, n)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    # alone in the pool and still no room: the cache's capacity is its length limit
                    logger.warning("request %s reached the cache capacity (%d tokens); finishing it",
                                   req.request_id, self.block_pool.token_capacity)
                    self.finish(req, RequestStatus.FINISHED_LENGTH)
                    out.finished.append(req)
                    break
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim.request_id in chosen:
                    budget += chosen.pop(victim.request_id)[1]
                if victim is req:
                    break
            else:
                chosen[req.request_id] = (req, n)
                budget -= n

        # waiting requests (none if this step had to preempt)
        pc = self.prefix_cache
        while (not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.state_pool.can_allocate()):
            req = self.waiting[0]
            hit = pc.lookup(req) if pc is not None and req.use_prefix_cache else None
            if hit is None:
                n = min(req.num_uncomputed_tokens, budget)
                need, shared = self.block_pool.blocks_needed(n), 0
            else:
                n = pc.chunk_tokens(req, min(req.num_tokens - hit.num_tokens, budget), hit.num_tokens,
                                    pc.targets(req, hit))
                need = self.block_pool.blocks_needed(hit.num_tokens + n) - len(hit.block_ids)
                shared = pc.blocks_taken_from_free(hit)
            if not self.block_pool.can_allocate(need + shared):
                break
            self.waiting.popleft()
            self._give_slot(req)
            if hit is None:
                req.block_ids = []
            else:
                pc.admit(req, hit, out.snapshots)  # shares the hit's blocks before any allocation can evict them
            req.block_ids.extend(self.block_pool.allocate(need))
            if hit is None or hit.snapshot is None:
                out.reset_slots.append(req.state_slot)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen[req.request_id] = (req, n)
            budget -= n

        out.scheduled = list(chosen.values())
        if pc is not None:
            pc.plan_saves([(r, n) for r, n in out.scheduled if r.use_prefix_cache], out.snapshots)
        self._count(out)
        return out

    def _count(self, out: SchedulerOutput) -> None:
        s = self.stats
        s.num_steps += not out.is_empty  # steps that run the model (an empty one only reads a token back)
        s.max_running = max(s.max_running, len(self.running))
        kinds = set()
        for req, n in out.scheduled:
            prefill = req.num_uncomputed_tokens > 1
            kinds.add(prefill)
            if prefill and n < req.num_uncomputed_tokens:
                s.num_chunked_prefills += 1
        if kinds == {True, False}:
            s.num_mixed_steps += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; `sampled` maps request id -> the token sampled for it (only
        requests whose step reached their last token). Returns the requests that got a token."""
        changed = self.advance(out, sampled)
        for req in changed:
            self.resolve_token(req, sampled[req.request_id])
        return changed

    def advance(self, out: SchedulerOutput, sampled) -> list[Request]:
        """The value-free half of `update_from_output`, run once the step is launched: commit its snapshot
        plan, advance `num_computed_tokens`, index newly full blocks, and append a placeholder token to each
        running request in `sampled` (request ids). Returns those requests; `resolve_token` completes each."""
        changed = []
        pc = self.prefix_cache
        if pc is not None:
            pc.commit(out.snapshots)
        for req, n in out.scheduled:
            if req.status != RequestStatus.RUNNING:  # finished or preempted meanwhile
                continue
            req.num_computed_tokens += n
            if pc is not None and req.use_prefix_cache:
                pc.register_blocks(req)  # computed tokens only: never the placeholder appended below
            if req.request_id not in sampled:
                continue
            if req.num_computed_tokens != req.num_tokens:
                raise RuntimeError(f"{req.request_id}: sampled before its last token was computed")
            req.append_placeholder()
            changed.append(req)
        return changed

    def resolve_token(self, req: Request, token: int) -> bool:
        """The placeholder of `req` becomes `token`; apply the token-id stop rules and free the request if they
        end it. It may have been preempted meanwhile (async scheduling: the next step was scheduled first),
        or finished by the cache's capacity, which a stop token overrides (as if the token came first).
        Returns True when the request is finished."""
        req.fill_placeholder(token)
        was_finished = req.is_finished
        if req.check_stop(self.max_model_len) and not was_finished:
            self.finish(req, req.status)
        return req.is_finished

    # ------------------------------------------------------------------ direct admission
    def admit_computed(self, request: Request, num_computed_tokens: int) -> None:
        """Admit `request` as RUNNING with its first `num_computed_tokens` tokens already in the caches
        (benchmarks fill the caches themselves; prefix/state restore later). Allocates its blocks and
        slot from the pools; the caller fills the cache contents. Raises RuntimeError when they do not fit."""
        if not 0 <= num_computed_tokens < request.num_tokens:
            raise ValueError(f"num_computed_tokens must be in [0, {request.num_tokens}), got {num_computed_tokens}")
        need = self.block_pool.blocks_needed(num_computed_tokens + 1)
        if (not self.block_pool.can_allocate(need) or not self.state_pool.can_allocate()
                or len(self.running) >= self.max_num_seqs):
            raise RuntimeError(f"cannot admit {request.request_id}: pools or max_num_seqs exhausted")
        request.block_ids = self.block_pool.allocate(need)
        self._give_slot(request)
        request.use_prefix_cache = False  # the caller's cache contents are not the tokens' (never index them)
        request.num_computed_tokens = num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)
