"""ModelRunner: owns the model, the cache tensors and the decode graphs; turns a scheduled step into
a forward pass and sampled tokens.

Lifetime: load weights -> size the caches from the model's cache specs (`memory.py`) -> allocate them
(`model.make_cache`), the prefix cache's state snapshots (`SlotSnapshots`) and the persistent
`BlockTable` -> capture decode CUDA graphs (unless eager or on the CPU). Per step (`execute`): zero the
state slots handed out this step, restore the slots of prefix-cache hits from their snapshots, copy new
block ids into the block table, then either the decode path (`DecodeRunner`: static padded buffers, graph replay) when
every sequence computes one token, or an eager flat forward (prefill chunks, mixed batches, whose decode
rows the layers still run on the decode kernels: `ForwardContext.row_runs`; KIMI_LINEAR_SPLIT_MIXED_DECODES=0
runs every row of a mixed batch chunked instead, a debugging switch), and
then copy the slots that the scheduler snapshots this step (eager device copies after the forward, never
inside a captured graph), and finally sample the rows whose step reached their last token
(`engine/sampler.py`).

Sampling gets every row's prompt / output token ids and the EOS ids (penalties, bad_words,
min_tokens) and, when a row has a structured-output matcher, a token bitmask filled by the matchers
(a cached CPU buffer; rows without a matcher allow everything). Prompt logprobs are computed from the
logits of the prompt positions of each chunk (`BatchInputs.prompt_logprobs`), `PROMPT_LOGPROB_ROWS`
rows at a time, so a long chunk never holds [T, vocab] logits.
"""

from __future__ import annotations

import logging
import os

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.engine.block_pool import cdiv
from kimi_linear.engine.block_table import BlockTable
from kimi_linear.engine.config import EngineConfig
from kimi_linear.engine.cuda_graph import DecodeRunner
from kimi_linear.engine.input_batch import BatchInputs, build_batch
from kimi_linear.engine.memory import PROMPT_LOGPROB_ROWS, CacheSizing, cpu_sizing, cuda_sizing
from kimi_linear.engine.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from kimi_linear.engine.scheduler import SchedulerOutput
from kimi_linear.engine.step_result import LaunchedStep, PendingSample, PromptLogprobRow, SampleResult, StepResult
from kimi_linear.errors import ConfigError
from kimi_linear.models import ForwardContext, KimiLinearForCausalLM
from kimi_linear.models.cache import SlotSnapshots, to_device

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device
        self.dtype = config.torch_dtype(model_config)
        self.block_size = config.block_size
        self.split_decodes = os.environ.get("KIMI_LINEAR_SPLIT_MIXED_DECODES", "1") != "0"
        user_len = config.max_model_len is not None
        max_model_len = config.resolve_max_model_len(model_config)
        free_at_start = 0
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)  # graphs and pinned copies follow the current device
            free_at_start = torch.cuda.mem_get_info(self.device)[0]

        self.model = KimiLinearForCausalLM.from_pretrained(
            config.model, device=self.device, dtype=self.dtype, load_format=config.load_format,
            seed=config.seed, progress=False, config=model_config, quantization=config.quantization)
        self.model.requires_grad_(False)  # inference only: the fused kernels have no backward
        table_width = cdiv(max_model_len, self.block_size)
        table_bytes = table_width * 4
        self.kv_cache_dtype = config.cache_dtype(model_config)
        specs = self.model.cache_specs(self.model.config, self.dtype, self.kv_cache_dtype)  # make_cache: the same
        if self.device.type == "cuda":
            sizing = cuda_sizing(self.model, specs, self.device, config, max_model_len,
                                 free_at_start, table_bytes, max_model_len if user_len else self.block_size)
        else:
            sizing = cpu_sizing(specs, config, max_model_len, table_bytes)
        self.max_model_len = self._fit_max_model_len(max_model_len, sizing, user_len)
        self.sizing = sizing
        sizing.log(self.max_model_len)

        self.cache = self.model.make_cache(sizing.num_blocks, self.block_size, sizing.num_slots, self.device,
                                           self.dtype, self.kv_cache_dtype)
        self.snapshots = SlotSnapshots(self.cache, sizing.num_snapshots)
        self.block_table = BlockTable(sizing.num_slots, cdiv(self.max_model_len, self.block_size), self.device)
        self.max_num_seqs = min(config.max_num_seqs, sizing.num_slots)
        max_graph = min(config.max_cuda_graph_batch_size or self.max_num_seqs, self.max_num_seqs)
        self.decode = DecodeRunner(self.model, self.cache, self.block_table, self.max_num_seqs, self.max_model_len,
                                   self.device)
        if config.use_cuda_graphs:
            with torch.no_grad():
                self.decode.capture(max_graph)  # larger batches run eagerly on the static buffers
        self.sampler = Sampler()
        self._bitmask: torch.Tensor | None = None  # [max_num_seqs, ceil(V / 32)] int32 (structured output)

    @staticmethod
    def _fit_max_model_len(max_model_len: int, sizing: CacheSizing, user_len: bool) -> int:
        cap = sizing.token_capacity if sizing.bytes_per_block else max_model_len
        if cap >= max_model_len:
            return max_model_len
        if user_len:
            raise ConfigError("max_model_len", f"{max_model_len} tokens do not fit in the paged cache "
                                               f"({cap} tokens); lower max_model_len or give the cache more memory")
        logger.warning("max_model_len lowered from %d to the cache capacity %d", max_model_len, cap)
        return cap

    @property
    def num_blocks(self) -> int:
        return self.sizing.num_blocks

    @property
    def num_slots(self) -> int:
        return self.sizing.num_slots

    @property
    def num_snapshots(self) -> int:
        return self.sizing.num_snapshots

    @property
    def needs_state_snapshots(self) -> bool:
        """The model keeps per-sequence state (slot layers): a prefix-cache hit needs a state snapshot too."""
        return self.sizing.bytes_per_snapshot > 0

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def forward(self, out: SchedulerOutput, use_graph: bool = True,
                inputs_from: PendingSample | None = None) -> tuple[torch.Tensor, BatchInputs]:
        """Run the model on a scheduled step: logits [R, vocab] of the R rows to sample, and the batch.
        `inputs_from` (async scheduling): the step in flight, whose device tokens fill the input positions
        that are still placeholders on the host."""
        if out.reset_slots:
            self.cache.reset_slots(out.reset_slots)
        plan = out.snapshots
        if plan.restores:  # prefix-cache hits: the slot starts from the snapshot's state
            self.snapshots.restore([s for s, _ in plan.restores], [slot for _, slot in plan.restores])
        batch = build_batch(out, self.block_size)
        patch = self._input_patch(batch, inputs_from)
        self.block_table.sync(batch.requests)
        if batch.is_decode:
            logits = self.decode.run(batch.input_ids, batch.state_indices, batch.slot_mapping, batch.seq_lens,
                                     use_graph=use_graph, patch=patch)
            self._save_snapshots(out)
            batch.prompt_logprob_rows = self._prompt_logprobs(batch, lambda idx: logits[idx])
            if len(batch.sample_seq) != batch.num_seqs:  # 1-token prefill chunks that do not sample
                logits = logits[batch.sample_seq]
            return logits, batch
        logits = self._forward_eager(batch, patch)
        self._save_snapshots(out)
        return logits, batch

    def _input_patch(self, batch: BatchInputs, src: PendingSample | None):
        """The function that writes the in-flight tokens of `src` into a step's device input ids, or None.
        A placeholder is always a sequence's last token, so it sits at the end of its (one-token) chunk."""
        dst, rows, flat = [], [], 0
        for req, q in zip(batch.requests, batch.query_lens):
            flat += q
            if not req.num_placeholders:
                continue
            row = src.rows.get(req.request_id) if src is not None else None
            if row is None or req.num_computed_tokens + q != req.num_tokens:
                raise RuntimeError(f"{req.request_id}: scheduled with a token in flight that no step provides")
            dst.append(flat - 1)
            rows.append(row)
        if not dst:
            return None
        tokens = src.token_ids
        k = len(dst)
        if dst == rows == list(range(k)):  # the steady decode batch: the same sequences in the same order
            return lambda ids: ids[:k].copy_(tokens[:k])
        d, r = to_device(dst, torch.int64, self.device), to_device(rows, torch.int64, self.device)
        return lambda ids: ids.index_copy_(0, d, tokens.index_select(0, r))

    def _save_snapshots(self, out: SchedulerOutput) -> None:
        """After the forward (stream-ordered after the graph replay, outside it): copy the slots whose chunk
        ended on a block boundary into their snapshots."""
        saves = out.snapshots.saves
        if saves:
            self.snapshots.save([s.slot for s in saves], [s.snapshot for s in saves])

    def _forward_eager(self, batch: BatchInputs, patch=None) -> torch.Tensor:
        dev = self.device

        def t(values, dtype):
            return to_device(values, dtype, dev)  # pinned: a pageable copy may wait for the step in flight

        state_indices = t(batch.state_indices, torch.int32)
        max_seq_len = max(batch.seq_lens)
        ctx = ForwardContext(
            cu_seqlens=t(batch.cu_seqlens, torch.int32), query_lens=batch.query_lens,
            context_lens=batch.context_lens, is_decode=False, cache=self.cache, state_indices=state_indices,
            slot_mapping=t(batch.slot_mapping, torch.int64),
            block_tables=self.block_table.rows(state_indices, cdiv(max_seq_len, self.block_size)),
            seq_lens=t(batch.seq_lens, torch.int32), max_seq_len=max_seq_len, split_decodes=self.split_decodes)
        input_ids = t(batch.input_ids, torch.int64)
        if patch is not None:
            patch(input_ids)
        hidden = self.model.forward_flat(input_ids, ctx)
        batch.prompt_logprob_rows = self._prompt_logprobs(batch, lambda idx: self.model.compute_logits(hidden[idx]))
        if not batch.sample_index:
            return hidden.new_empty(0, self.model_config.vocab_size)
        return self.model.compute_logits(hidden[t(batch.sample_index, torch.int64)])

    def _prompt_logprobs(self, batch: BatchInputs, logits_of) -> list:
        """Prompt logprob rows of the batch's prompt positions; `logits_of(flat_index [n]) -> logits [n, V]`."""
        out = []
        for req, flat, pos, count in batch.prompt_logprobs:
            k = req.sampling_params.prompt_logprobs
            rows: list[PromptLogprobRow] = []
            for s in range(0, count, PROMPT_LOGPROB_ROWS):
                e = min(count, s + PROMPT_LOGPROB_ROWS)
                idx = torch.arange(flat + s, flat + e, device=self.device)
                targets = req.prompt_token_ids[pos + s + 1:pos + e + 1]
                res = compute_prompt_logprobs(logits_of(idx), torch.tensor(targets), k, PROMPT_LOGPROB_ROWS)
                lps, ranks = res.logprobs.tolist(), res.ranks.tolist()
                tids = res.top_ids.tolist() if res.top_ids is not None else [[]] * len(targets)
                tlps = res.top_logprobs.tolist() if res.top_logprobs is not None else [[]] * len(targets)
                rows.extend(PromptLogprobRow(t, lp, r, list(zip(ti, tl)))
                            for t, lp, r, ti, tl in zip(targets, lps, ranks, tids, tlps))
            out.append((req, rows))
        return out

    def _fill_bitmask(self, requests: list) -> torch.Tensor | None:
        """Token bitmask [R, ceil(V / 32)] int32 of the sampled rows on the device, or None when no row has a
        grammar. The matchers fill a cached host buffer; the step gets its own device copy (`to_device`), so the
        next step may refill the buffer while this one's copy is still queued behind the step in flight."""
        if all(r.matcher is None for r in requests):
            return None
        if self._bitmask is None:
            V = self.model_config.vocab_size
            self._bitmask = torch.empty(self.max_num_seqs, (V + 31) // 32, dtype=torch.int32)
        bitmask = self._bitmask[:len(requests)]
        bitmask.fill_(-1)
        for i, r in enumerate(requests):
            if r.matcher is not None:
                r.matcher.fill_bitmask(bitmask, i)
        return to_device(bitmask, torch.int32, self.device)

    @torch.no_grad()
    def sample_async(self, logits: torch.Tensor, requests: list) -> PendingSample:
        """Enqueue the sampling of `requests` (one row of `logits` each) and the copies of its results to the
        host; nothing here waits for the device."""
        if not requests:
            return PendingSample([], None, None, self.device)
        params = [r.sampling_params for r in requests]
        batch = SamplingBatch.build(
            params, [r.generator for r in requests], self.model_config.vocab_size, self.device,
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            eos_token_ids=sorted(requests[0].eos_token_ids), bitmask=self._fill_bitmask(requests))
        so = self.sampler(logits, batch)
        return PendingSample(requests, so, torch.isfinite(logits).all(dim=-1), self.device)

    def sample(self, logits: torch.Tensor, requests: list) -> dict[str, SampleResult]:
        return self.sample_async(logits, requests).results()

    def launch(self, out: SchedulerOutput, inputs_from: PendingSample | None = None) -> LaunchedStep:
        """Forward + sampling, enqueued: the tokens come back through `LaunchedStep.sample`. The sampling is
        enqueued before the next step's forward, so it reads the graph's static logits before a replay
        overwrites them."""
        logits, batch = self.forward(out, inputs_from=inputs_from)
        return LaunchedStep(self.sample_async(logits, batch.sample_requests), batch.prompt_logprob_rows)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Forward + sample: the new token of each request whose step reached its end, and prompt logprobs."""
        return self.launch(out).result()

    def release(self) -> None:
        """Drop the graphs, cache and model so that their device memory can be freed. Waits for the device
        first: with async scheduling a step is still in flight after `LLMEngine.step()` returns."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.decode.release()
        self.decode = None
        self.cache = None
        self.snapshots = None
        self.block_table = None
        self.model = None
