"""Cache sizing: how many cache blocks and state slots the engine allocates.

Sizes come from the model's cache specs alone (`KimiLinearForCausalLM.cache_specs`, one per layer,
handled by their attributes only): a block holds `block_size` tokens of every paged layer (MLA),
`ModelCache.bytes_per_block`; a slot holds one sequence's state of every slot layer (KDA),
`ModelCache.bytes_per_slot`, plus the sequence's row of the runner's block table.

On CUDA (nano-vllm / vLLM style): after the weights are loaded, one profiling forward over
`max_num_batched_tokens` tokens (no cache) plus the lm_head and the sampler over `max_num_seqs` rows
measures the peak activation memory (`torch.cuda.max_memory_allocated`). The sampler runs with every
[B, V] buffer it can allocate (`profile_sampler`: penalty counts and prompt mask, allowed-token mask,
structured-output bitmask, min_p, the top-k / top-p sort, 20 top logprobs), then prompt logprobs over
one chunk of rows, so the peak covers the worst step. The caches then get
    total * gpu_memory_utilization - weights - peak activations - non-torch memory - graph reserve,
capped by what is actually free. `plan_cache` splits that: state slots = max_num_seqs (fewer when
memory is short, keeping room for one max_model_len sequence of blocks), the rest blocks.

On the CPU: the override knobs, or a modest default (slots = max_num_seqs, blocks for
min(max_model_len * max_num_seqs, max(max_model_len, 2^18)) tokens).

Prefix caching adds the state-snapshot pool (`snapshot_count`): snapshots of one slot's states
(`SlotSnapshots.bytes_per_snapshot`, without the block-table row) taking `prefix_cache_state_fraction`
of the cache memory; on CUDA they are carved out of the available bytes before `plan_cache`, with
fixed blocks and slots (overrides, the CPU) they come on top, so that they are that fraction of the
total. On the CPU at least one snapshot per slot. `num_state_snapshots_override` fixes the count.
The result is logged as token capacity, maximum concurrent sequences and snapshots.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from kimi_linear.engine.block_pool import cdiv
from kimi_linear.errors import ConfigError
from kimi_linear.models import ForwardContext, ModelCache
from kimi_linear.models.cache import SlotSnapshots

logger = logging.getLogger(__name__)
GiB = 1024 ** 3
CPU_DEFAULT_TOKENS = 1 << 18
PROMPT_LOGPROB_ROWS = 256  # prompt-logprob rows computed at once (model_runner imports it)


@dataclass(frozen=True)
class CacheSizing:
    num_blocks: int
    num_slots: int
    block_size: int
    bytes_per_block: int
    bytes_per_slot: int
    num_snapshots: int = 0
    bytes_per_snapshot: int = 0

    @property
    def token_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrent(self, max_model_len: int) -> int:
        """Sequences of max_model_len tokens that fit at once (slots and blocks both)."""
        if self.bytes_per_block == 0:
            return self.num_slots
        return min(self.num_slots, self.token_capacity // max_model_len)

    def log(self, max_model_len: int) -> None:
        logger.info("paged cache: %d blocks x %d tokens = %d tokens (%.2f GiB); state slots: %d "
                    "(%.2f GiB); max concurrent sequences of %d tokens: %d", self.num_blocks, self.block_size,
                    self.token_capacity, self.num_blocks * self.bytes_per_block / GiB, self.num_slots,
                    self.num_slots * self.bytes_per_slot / GiB, max_model_len, self.max_concurrent(max_model_len))
        if self.bytes_per_snapshot:
            logger.info("prefix cache: %d KDA state snapshots fit (%.2f GiB, %.1f MiB each)", self.num_snapshots,
                        self.num_snapshots * self.bytes_per_snapshot / GiB, self.bytes_per_snapshot / 2 ** 20)


def snapshot_count(config, bytes_per_snapshot: int, total_bytes: int, on_top: bool) -> int:
    """State snapshots of the prefix cache: 0 when it is off or the model keeps no slot state; the
    override; else `prefix_cache_state_fraction` of the cache memory: of `total_bytes` (everything for the
    caches), or, `on_top`, so that the snapshots are that fraction of `total_bytes` plus themselves."""
    if not config.enable_prefix_caching or bytes_per_snapshot == 0:
        return 0
    if config.num_state_snapshots_override is not None:
        return config.num_state_snapshots_override
    f = config.prefix_cache_state_fraction
    nbytes = total_bytes * f / (1 - f) if on_top else total_bytes * f
    return int(nbytes // bytes_per_snapshot)


def plan_cache(available_bytes: int, bytes_per_block: int, bytes_per_slot: int, block_size: int,
               max_num_seqs: int, min_tokens: int, num_blocks: int | None = None,
               num_slots: int | None = None) -> tuple[int, int]:
    """Split `available_bytes` into (num_blocks, num_slots). Slots come first (up to max_num_seqs),
    leaving blocks for at least `min_tokens` tokens; fixed `num_blocks` / `num_slots` are honoured.
    Raises ConfigError when not even one slot and `min_tokens` of blocks fit."""
    min_blocks = cdiv(min_tokens, block_size)
    if num_slots is None:
        room = available_bytes - (num_blocks if num_blocks is not None else min_blocks) * bytes_per_block
        num_slots = max_num_seqs if bytes_per_slot == 0 else min(max_num_seqs, room // bytes_per_slot)
    if num_blocks is None:
        if bytes_per_block == 0:
            num_blocks = max(min_blocks, 1) * max(num_slots, 1)
        else:
            num_blocks = (available_bytes - max(num_slots, 0) * bytes_per_slot) // bytes_per_block
    if num_slots < 1 or num_blocks < min_blocks or num_blocks < 1:
        need = min_blocks * bytes_per_block + bytes_per_slot
        raise ConfigError("gpu_memory_utilization",
                          f"{available_bytes / GiB:.2f} GiB left for the caches cannot hold one sequence of "
                          f"{min_tokens} tokens ({need / GiB:.2f} GiB); raise gpu_memory_utilization or lower "
                          f"max_model_len / max_num_batched_tokens")
    return int(num_blocks), int(num_slots)


def cpu_sizing(specs: list, config, max_model_len: int, table_bytes_per_slot: int) -> CacheSizing:
    bs = config.block_size
    tokens = min(max_model_len * config.max_num_seqs, max(max_model_len, CPU_DEFAULT_TOKENS))
    num_blocks = config.num_gpu_blocks_override or cdiv(tokens, bs)
    num_slots = config.num_state_slots_override or config.max_num_seqs
    bpb = ModelCache.bytes_per_block(specs, bs)
    bps = ModelCache.bytes_per_slot(specs) + table_bytes_per_slot
    bpsnap = SlotSnapshots.bytes_per_snapshot(specs)
    snaps = snapshot_count(config, bpsnap, num_blocks * bpb + num_slots * bps, on_top=True)
    if config.enable_prefix_caching and config.num_state_snapshots_override is None and bpsnap:
        snaps = max(snaps, num_slots)
    return CacheSizing(num_blocks=num_blocks, num_slots=num_slots, block_size=bs, bytes_per_block=bpb,
                       bytes_per_slot=bps, num_snapshots=snaps, bytes_per_snapshot=bpsnap)


@torch.no_grad()
def profile_peak_activation(model, num_tokens: int, max_seq_len: int, num_logit_rows: int, device) -> int:
    """Run one cache-less forward over `num_tokens` tokens (sequences of at most `max_seq_len`), the
    lm_head and the sampler over `num_logit_rows` rows; return the peak memory above the weights."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    lens = [max_seq_len] * (num_tokens // max_seq_len)
    if num_tokens % max_seq_len:
        lens.append(num_tokens % max_seq_len)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (num_tokens,), device=device)
    hidden = model.forward_flat(ids, ForwardContext.for_prefill(lens, device))
    rows = torch.arange(num_logit_rows, device=device) % num_tokens
    logits = model.compute_logits(hidden[rows])
    plp_rows = torch.arange(min(num_tokens, PROMPT_LOGPROB_ROWS), device=device)
    plp_logits = model.compute_logits(hidden[plp_rows])
    del hidden
    profile_sampler(logits, plp_logits)
    del logits, plp_logits
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def profile_sampler(logits: torch.Tensor, prompt_logits: torch.Tensor | None = None):
    """Run the sampler over logits [B, V] with every per-row buffer in use (the worst case of memory), and
    prompt logprobs (20 top) over prompt_logits [T, V]. Returns the SamplingBatch used. Device-agnostic."""
    from kimi_linear.engine.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
    from kimi_linear.sampling_params import SamplingParams

    B, V = logits.shape
    dev = logits.device
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                             frequency_penalty=0.1, presence_penalty=0.1, logprobs=20, min_tokens=1,
                             logit_bias={0: 0.5}, allowed_token_ids=list(range(min(V, 64))), max_tokens=None)] * B
    bitmask = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32)
    batch = SamplingBatch.build(params, [None] * B, V, dev, prompt_token_ids=[[0, 1]] * B,
                                output_token_ids=[[]] * B, eos_token_ids=[0], bitmask=bitmask)
    Sampler()(logits, batch)
    if prompt_logits is not None and len(prompt_logits):
        targets = torch.zeros(len(prompt_logits), dtype=torch.int64, device=dev)
        compute_prompt_logprobs(prompt_logits, targets, 20, PROMPT_LOGPROB_ROWS)
    return batch


def cuda_sizing(model, specs: list, device, config, max_model_len: int, free_at_start: int,
                table_bytes_per_slot: int, min_tokens: int) -> CacheSizing:
    """Profile, then size the caches of `specs` from `config.gpu_memory_utilization` (see module docstring)."""
    bs = config.block_size
    bpb = ModelCache.bytes_per_block(specs, bs)
    bps = ModelCache.bytes_per_slot(specs) + table_bytes_per_slot
    bpsnap = SlotSnapshots.bytes_per_snapshot(specs)
    if config.num_gpu_blocks_override and config.num_state_slots_override:
        nb, ns = config.num_gpu_blocks_override, config.num_state_slots_override
        snaps = snapshot_count(config, bpsnap, nb * bpb + ns * bps, on_top=True)
        return CacheSizing(nb, ns, bs, bpb, bps, snaps, bpsnap)
    free, total = torch.cuda.mem_get_info(device)
    requested = int(total * config.gpu_memory_utilization)
    others = total - free_at_start  # memory other processes (and our CUDA context) held at start
    if free_at_start < requested:
        raise ConfigError("gpu_memory_utilization",
                          f"{config.gpu_memory_utilization} of {total / GiB:.1f} GiB requested but only "
                          f"{free_at_start / GiB:.1f} GiB are free; lower gpu_memory_utilization")
    tokens = config.max_num_batched_tokens
    peak = profile_peak_activation(model, tokens, min(max_model_len, tokens), config.max_num_seqs, device)
    free, total = torch.cuda.mem_get_info(device)
    ours = total - free - others  # this engine's footprint now: weights, buffers, allocator cache, ...
    reserve = config.cuda_graph_reserve_bytes if config.use_cuda_graphs else 0
    available = min(requested - ours - peak - reserve, free - peak - reserve)
    logger.info("memory: %.2f GiB requested, %.2f GiB in use (weights and buffers), peak activations %.2f GiB, "
                "%.2f GiB kept for CUDA graphs -> %.2f GiB for the caches", requested / GiB, ours / GiB,
                peak / GiB, reserve / GiB, max(available, 0) / GiB)
    snaps = snapshot_count(config, bpsnap, max(available, 0), on_top=False)
    num_blocks, num_slots = plan_cache(max(available - snaps * bpsnap, 0), bpb, bps, bs, config.max_num_seqs,
                                       min_tokens, config.num_gpu_blocks_override, config.num_state_slots_override)
    return CacheSizing(num_blocks, num_slots, bs, bpb, bps, snaps, bpsnap)
