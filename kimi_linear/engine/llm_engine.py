"""LLMEngine: validate and add requests, then `step()`: schedule -> run the model -> update -> outputs.

A prompt with n > 1 becomes n `Request`s ("{i}_{id}"), each with its own cache and, when seeded,
its own generator (seed + i); one `RequestState` gathers them into a single RequestOutput.
Every user mistake (empty prompt, token id out of the vocabulary, prompt + max_tokens beyond
max_model_len, a text prompt without a tokenizer, invalid sampling fields, an invalid structured-output
constraint) raises ValidationError naming the field before anything is queued (`process_inputs`, see
`input_processor.py`; safe to call from another thread than `step()`). `step()` returns the
RequestOutputs of requests that finished (and of streamed requests that progressed); `abort_request`
finishes requests with "abort".

Per step, after the runner sampled: prompt-logprob rows go to the first sequence's processor; each
new token is accepted by the sequence's grammar matcher (structured output: a terminated grammar
finishes the sequence with "stop", a rejected token - constraints that exclude every token - with
"abort"), then handed to its processor, which may finish it on a stop string. A token sampled from
non-finite logits (NaN / inf) is dropped and finishes its sequence with "error".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.config import EngineConfig, default_sampling_kwargs, eos_token_ids, read_generation_config
from kimi_linear.engine.input_processor import ContextLengthError, InputProcessor, ProcessedPrompt
from kimi_linear.engine.model_runner import ModelRunner
from kimi_linear.engine.overlap import InflightStep, can_overlap
from kimi_linear.engine.outputs import RequestMetrics, RequestOutput, RequestState, SequenceProcessor, TextProcessor
from kimi_linear.engine.prefix_cache import PrefixCache
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.scheduler import Scheduler
from kimi_linear.engine.stats import EngineStats
from kimi_linear.engine.snapshot_pool import SnapshotPool
from kimi_linear.engine.state_pool import StatePool
from kimi_linear.engine.structured_output import StructuredOutputs
from kimi_linear.errors import ConfigError, ValidationError
from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["ContextLengthError", "EngineStats", "LLMEngine", "ProcessedPrompt"]


class LLMEngine:
    """The engine. Its public interface for frontends (server, CLI, `LLM`): `tokenizer`, `max_model_len`,
    `max_num_seqs`, `max_logprobs`, `vocab_size`, `model_path`, `sampling_defaults` /
    `default_sampling_params()`, `process_inputs()` (validation), `add_request` / `add_processed` /
    `abort_request`, `step()`, `has_unfinished_requests()`, `stats()`, `describe()`, `shutdown()`. Every
    RequestOutput carries its `metrics` (arrival, first scheduled, first / last token, finish times)."""

    def __init__(self, config: EngineConfig,
                 processor_factory: Callable[[Request, object], SequenceProcessor] = TextProcessor,
                 model_config: ModelConfig | None = None):
        """`model_config`: the checkpoint's parsed config.json when the caller has it already (else read here)."""
        self.config = config
        for line in config.notices():
            logger.warning("%s", line)
        self.model_config = model_config if model_config is not None else config.load_model_config()
        self.generation_config = read_generation_config(config.generation_config_dir)
        self.eos_token_ids = eos_token_ids(self.model_config, self.generation_config)
        self._sampling_defaults = {} if config.generation_config == "vllm" else \
            default_sampling_kwargs(self.generation_config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        if self.tokenizer is None and config.tokenizer is not None:
            raise ConfigError("tokenizer", f"no tokenizer (tiktoken.model) in {config.tokenizer}")
        template = config.load_chat_template()
        if template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = template
        self.processor_factory = processor_factory
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.model_config.vocab_size
        block_pool = BlockPool(self.runner.num_blocks, config.block_size)
        self.prefix_cache = PrefixCache(block_pool, SnapshotPool(self.runner.num_snapshots),
                                        config.prefix_caching_hash_algo, self.runner.needs_state_snapshots) \
            if config.enable_prefix_caching else None
        self.scheduler = Scheduler(block_pool, StatePool(self.runner.num_slots), self.runner.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len, self.prefix_cache)
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                            any_whitespace=config.structured_outputs_any_whitespace)
        self.input_processor = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len, self.structured,
                                              config.model, self.eos_token_ids, config.max_logprobs)
        self._states: dict[str, RequestState] = {}
        self._streaming: set[str] = set()
        self._dirty: set[str] = set()  # parents with news not yet reported (aborts)
        self._num_scheduled_tokens = 0
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self.async_scheduling = config.async_scheduling  # a benchmark may flip it between steps with none in flight
        self._inflight: InflightStep | None = None  # async scheduling: the launched step not yet resolved
        self._num_overlapped_steps = 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------ facts for frontends
    @property
    def model_path(self) -> str:
        """The checkpoint folder."""
        return self.config.model

    @property
    def max_num_seqs(self) -> int:
        """Requests that can run at once (the configured max_num_seqs, capped by the KDA state slots)."""
        return self.scheduler.max_num_seqs

    @property
    def max_logprobs(self) -> int:
        return self.config.max_logprobs

    @property
    def sampling_defaults(self) -> dict:
        """SamplingParams field -> default from generation_config.json ({} under generation_config="vllm")."""
        return dict(self._sampling_defaults)

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self._sampling_defaults)

    def stats(self) -> EngineStats:
        """A snapshot of the load; cheap, and safe to call from another thread than `step()` (values may be
        one step apart)."""
        s = self.scheduler
        bp, sp, pc = s.block_pool, s.state_pool, self.prefix_cache
        cache = {}
        if pc is not None:
            snap = pc.snapshot_pool
            cache = dict(prefix_caching=True, prefix_cache_queries=pc.stats.queries, prefix_cache_hits=pc.stats.hits,
                         num_blocks_cached=bp.num_cached_free, num_snapshots_used=snap.num_used,
                         num_snapshots=snap.num_snapshots)
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting),
                           num_blocks_used=bp.num_used, num_blocks=bp.num_used + bp.num_free,
                           num_slots_used=sp.num_used, num_slots=sp.num_used + sp.num_free,
                           num_scheduled_tokens=self._num_scheduled_tokens,
                           num_prompt_tokens=self._num_prompt_tokens,
                           num_generated_tokens=self._num_generated_tokens,
                           num_steps=s.stats.num_steps, num_preemptions=s.stats.num_preemptions,
                           num_overlapped_steps=self._num_overlapped_steps, **cache)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and state snapshot that no running request holds (vLLM's
        `reset_prefix_cache`); later requests compute their prompts in full until the cache refills."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()

    def describe(self) -> dict:
        """What a server logs at startup: the resolved engine config, the model's shape, dtype and device, and
        the cache capacity (MLA tokens, KDA slots, sequences that fit at max_model_len). Plain JSON-able values."""
        mc, cfg = self.model_config, self.config
        s = self.stats()
        resolved = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        resolved.update(max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                        device=str(self.device), dtype=str(self.runner.dtype).removeprefix("torch."))
        kinds = list(mc.layer_types)
        cache_tokens = s.num_blocks * cfg.block_size
        return {
            "config": resolved,
            "model": {"num_hidden_layers": mc.num_hidden_layers, "layer_types": kinds,
                      "num_kda_layers": kinds.count("kda"), "num_mla_layers": kinds.count("mla"),
                      "hidden_size": mc.hidden_size, "vocab_size": mc.vocab_size, "num_experts": mc.num_experts,
                      "num_experts_per_token": mc.num_experts_per_token,
                      "num_shared_experts": mc.num_shared_experts, "num_moe_layers": list(mc.mlp_types).count("moe")},
            "cache": {"num_blocks": s.num_blocks, "block_size": cfg.block_size, "tokens": cache_tokens,
                      "num_state_slots": s.num_slots,
                      "seqs_at_max_model_len": min(s.num_slots, cache_tokens // max(1, self.max_model_len))},
        }

    # ------------------------------------------------------------------ inputs
    def process_inputs(self, prompt, params: SamplingParams) -> ProcessedPrompt:
        """Validate one prompt (str, {"prompt_token_ids": [...]} or {"prompt": str}) with its params.
        Thread-safe; mutates neither the engine nor `params`."""
        return self.input_processor.process(prompt, params)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    stream: bool = False) -> None:
        processed = prompt if isinstance(prompt, ProcessedPrompt) else \
            self.process_inputs(prompt, params if params is not None else self.default_sampling_params())
        self.add_processed(request_id, processed, stream)

    def add_processed(self, request_id: str, p: ProcessedPrompt, stream: bool = False) -> None:
        if request_id in self._states:
            raise ValidationError(f"request id {request_id!r} is already in use", param="request_id")
        n = p.params.n
        state = RequestState(request_id, p.prompt, p.prompt_token_ids, metrics=RequestMetrics(time.monotonic()))
        children = []
        for i in range(n):
            child_id = request_id if n == 1 else f"{i}_{request_id}"
            req = Request(child_id, p.prompt_token_ids, p.params, self.eos_token_ids, p.max_tokens,
                          parent_id=request_id, index=i)
            if p.params.seed is not None:
                req.generator = torch.Generator(device=self.device)
                req.generator.manual_seed((p.params.seed + i) % (1 << 64))
            if p.grammar is not None:
                req.matcher = self.structured.matcher(p.grammar)
            children.append(req)
            state.processors.append(self.processor_factory(req, self.tokenizer))
        for req in children:
            self.scheduler.add_request(req)
        self._states[request_id] = state
        if stream:
            self._streaming.add(request_id)

    def admit_computed(self, request_id: str, prompt, params: SamplingParams, num_computed_tokens: int) -> Request:
        """Admit a request (n = 1) as running with its first `num_computed_tokens` tokens taken as already
        cached: its blocks and state slot come from the pools now, the caller fills their contents
        (benchmarks reach long contexts this way). It decodes from the next step on."""
        p = self.process_inputs(prompt, params)
        if p.params.n != 1:
            raise ValidationError("admit_computed takes n = 1", param="n")
        if p.params.prompt_logprobs is not None:
            raise ValidationError("admit_computed cannot compute prompt logprobs", param="prompt_logprobs")
        if request_id in self._states:
            raise ValidationError(f"request id {request_id!r} is already in use", param="request_id")
        req = Request(request_id, p.prompt_token_ids, p.params, self.eos_token_ids, p.max_tokens)
        if p.grammar is not None:
            req.matcher = self.structured.matcher(p.grammar)
        self.scheduler.admit_computed(req, num_computed_tokens)
        self._states[request_id] = RequestState(request_id, p.prompt, p.prompt_token_ids,
                                                [self.processor_factory(req, self.tokenizer)],
                                                metrics=RequestMetrics(time.monotonic()))
        return req

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self._states.get(rid)
            if state is None:
                continue
            for proc in state.processors:
                self.scheduler.abort(proc.request.request_id)
            self._dirty.add(rid)

    # ------------------------------------------------------------------ stepping
    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def step(self) -> list[RequestOutput]:
        """One engine step: the outputs of the step this call completes. With async scheduling the next step
        is scheduled and launched before this one's tokens are read back, and stays in flight until the next
        call completes it (`engine/overlap.py`)."""
        touched = set(self._dirty)
        self._dirty.clear()
        cur, self._inflight = self._inflight, None
        if cur is None:
            cur = self._launch(touched)
            if cur is None:
                if not touched and self.scheduler.has_unfinished():
                    raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting "
                                       f"and {len(self.scheduler.running)} running requests")
                return self._outputs(touched)
            self._advance(cur)
        nxt = None
        if self.async_scheduling and can_overlap(cur):
            nxt = self._launch(touched, inputs_from=cur.launched.sample)  # while `cur` runs on the device
            self._num_overlapped_steps += nxt is not None
        self._resolve(cur, touched)
        outputs = self._outputs(touched)  # before `nxt` adds placeholders: outputs never hold one
        if nxt is not None:
            self._advance(nxt)
            if self.scheduler.has_unfinished():
                self._inflight = nxt
            else:  # only discarded speculative tokens left: complete it now, nothing is left in flight
                self._resolve(nxt, set())
        return outputs

    def _launch(self, touched: set[str], inputs_from=None) -> InflightStep | None:
        """Schedule a step and enqueue it on the device (forward + sampling); None when nothing was scheduled."""
        out = self.scheduler.schedule()
        touched.update(r.parent_id for r in out.finished)
        if out.is_empty:
            return None
        self._note_scheduled(out.scheduled, time.monotonic())
        launched = self.runner.launch(out, inputs_from=inputs_from)
        self._num_scheduled_tokens += out.total_num_tokens
        return InflightStep(out, launched)

    def _advance(self, step: InflightStep) -> None:
        """The host side of a launched step that needs no token value (`Scheduler.advance`)."""
        step.placeholders = self.scheduler.advance(step.out, step.launched.sample.rows)
        for req, rows in step.launched.prompt_logprobs:
            req.num_prompt_logprobs += len(rows)

    def _resolve(self, step: InflightStep, touched: set[str]) -> None:
        """Read back a launched step's tokens (the sync point), fill the placeholders and process each token:
        stop rules, grammar, stop strings, logprobs, detokenization."""
        result = step.launched.result()
        for req, rows in result.prompt_logprobs:
            state = self._states.get(req.parent_id)
            if state is not None:
                state.processors[req.index].on_prompt_logprobs(rows)
        sampled = result.sampled
        now = time.monotonic()
        for req in step.placeholders:
            if req.status == RequestStatus.FINISHED_ABORTED:
                req.fill_placeholder(None)  # aborted while its token was in flight: the token is dropped
                continue
            self.scheduler.resolve_token(req, sampled[req.request_id].token_id)
            self._num_generated_tokens += 1
            touched.add(req.parent_id)
            if not sampled[req.request_id].is_finite:
                self._finish_error(req)
                continue
            m = self._states[req.parent_id].metrics
            if m is not None:
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
            token = req.output_token_ids[-1]
            if req.matcher is not None:
                self._advance_grammar(req, token)
            proc = self._states[req.parent_id].processors[req.index]
            stop = proc.on_token(token, sampled[req.request_id])
            if stop is not None:
                self._finish(req, RequestStatus.FINISHED_STOPPED, stop)

    def _outputs(self, touched: set[str]) -> list[RequestOutput]:
        outputs = []
        for rid in touched:
            state = self._states.get(rid)
            if state is None:
                continue
            if state.finished and state.metrics is not None and state.metrics.finished_time is None:
                state.metrics.finished_time = time.monotonic()
            if state.finished or rid in self._streaming:
                outputs.append(state.output())
            if state.finished:
                del self._states[rid]
                self._streaming.discard(rid)
        return outputs

    def _note_scheduled(self, scheduled: list[tuple[Request, int]], now: float) -> None:
        """Per-step bookkeeping before the model runs: first-scheduled times and the prompt tokens computed."""
        for req, n in scheduled:
            m = self._states[req.parent_id].metrics
            if m is not None and m.first_scheduled_time is None:
                m.first_scheduled_time = now
            start, P = req.num_computed_tokens, req.num_prompt_tokens
            self._num_prompt_tokens += max(0, min(start + n, P) - min(start, P))

    def _finish(self, req: Request, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """Finish `req` from the output side; overrides a length finish of the same token (vLLM's order)."""
        if req.is_finished:
            if status == RequestStatus.FINISHED_STOPPED:
                req.status, req.stop_reason = status, stop_reason
        else:
            self.scheduler.finish(req, status, stop_reason=stop_reason)

    def _finish_error(self, req: Request) -> None:
        logger.error("request %s: the model produced non-finite logits (NaN or inf); finishing it with an error",
                     req.request_id)
        if req.is_finished:
            req.status = RequestStatus.FINISHED_ERROR
        else:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        req.output_token_ids.pop()  # the token drawn from those logits means nothing

    def _advance_grammar(self, req: Request, token: int) -> None:
        if not req.matcher.accept(token):
            logger.warning("request %s: token %d is not allowed by its grammar (the constraints exclude every "
                           "token); aborting the sequence", req.request_id, token)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        elif req.matcher.is_terminated() and not req.is_finished:
            self._finish(req, RequestStatus.FINISHED_STOPPED)

    def shutdown(self) -> None:
        """Abort everything and free the device memory held by the model, caches and graphs."""
        self.abort_request(list(self._states))
        self._states.clear()
        self._inflight = None
        if self.runner is not None:
            self.runner.release()
            self.runner = None
