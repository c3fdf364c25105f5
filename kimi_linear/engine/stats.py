"""EngineStats: a snapshot of the engine's load and counters (`LLMEngine.stats()`), read by the server's
/metrics and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (`LLMEngine.stats()`): request counts, MLA block and KDA slot
    usage, and counters since start (tokens run through the model, tokens sampled, steps, preemptions);
    the prefix cache: tokens looked up and found (vLLM's prefix_cache_queries / _hits), cached blocks
    without an owner, and the state-snapshot pool's use."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_used: int = 0
    num_blocks: int = 0
    num_slots_used: int = 0
    num_slots: int = 0
    num_scheduled_tokens: int = 0  # prompt chunks + decodes (recomputed tokens after preemption included)
    num_prompt_tokens: int = 0  # prompt tokens run through the model, counted per step (recomputation included)
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    num_overlapped_steps: int = 0  # async scheduling: steps launched while the previous one was in flight
    prefix_caching: bool = False
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, tokens found cached (not computed)
    num_blocks_cached: int = 0  # cached MLA blocks without an owner (counted free: evicted on demand)
    num_snapshots_used: int = 0
    num_snapshots: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_used / max(1, self.num_blocks)

    @property
    def snapshot_usage(self) -> float:
        return self.num_snapshots_used / max(1, self.num_snapshots)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / max(1, self.prefix_cache_queries)

    @property
    def state_slot_usage(self) -> float:
        return self.num_slots_used / max(1, self.num_slots)
