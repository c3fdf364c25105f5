"""LLMEngine: validate and add requests, then `step()`: schedule -> run the model -> update -> outputs.

A prompt with n > 1 becomes n `Request`s ("{i}_{id}"), each with its own cache and, when seeded,
its own generator (seed + i); one `RequestState` gathers them into a single RequestOutput.
Every user mistake (empty prompt, token id out of the vocabulary, prompt + max_tokens beyond
max_model_len, a text prompt without a tokenizer, invalid sampling fields) raises ValidationError
naming the field before anything is queued. `step()` returns the RequestOutputs of requests that
finished (and of streamed requests that progressed); `abort_request` finishes requests with "abort".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.engine.block_pool import BlockPool
from kimi_linear.engine.config import EngineConfig, default_sampling_kwargs, eos_token_ids, read_generation_config
from kimi_linear.engine.model_runner import ModelRunner
from kimi_linear.engine.outputs import RequestOutput, RequestState, SequenceProcessor
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.scheduler import Scheduler
from kimi_linear.engine.state_pool import StatePool
from kimi_linear.errors import ValidationError
from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig,
                 processor_factory: Callable[[Request, object], SequenceProcessor] = SequenceProcessor):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.generation_config = read_generation_config(config.model)
        self.eos_token_ids = eos_token_ids(self.model_config, self.generation_config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.processor_factory = processor_factory
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.model_config.vocab_size
        self.scheduler = Scheduler(BlockPool(self.runner.num_blocks, config.block_size),
                                   StatePool(self.runner.num_slots), self.runner.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self._states: dict[str, RequestState] = {}
        self._streaming: set[str] = set()
        self._dirty: set[str] = set()  # parents with news not yet reported (aborts)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**default_sampling_kwargs(self.generation_config))

    # ------------------------------------------------------------------ inputs
    def process_inputs(self, prompt, params: SamplingParams) -> ProcessedPrompt:
        """Validate one prompt (str, {"prompt_token_ids": [...]} or {"prompt": str}) with its params."""
        if not isinstance(params, SamplingParams):
            raise ValidationError(f"sampling_params must be a SamplingParams, got {type(params).__name__}",
                                  param="sampling_params")
        text, ids = None, None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
            else:
                raise ValidationError("a prompt dict needs 'prompt_token_ids' or 'prompt'", param="prompt")
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise ValidationError(f"a prompt must be a string or a dict with 'prompt_token_ids', got "
                                  f"{type(prompt).__name__}", param="prompt")
        if ids is None:
            if not isinstance(text, str):
                raise ValidationError("'prompt' must be a string", param="prompt")
            if self.tokenizer is None:
                raise ValidationError(f"text prompts need a tokenizer, and {self.config.model} has none "
                                      f"(no tiktoken.model); pass {{'prompt_token_ids': [...]}}", param="prompt")
            ids = self.tokenizer.encode(text)
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValidationError("prompt_token_ids must be a list of integers", param="prompt_token_ids")
        ids = list(ids)
        if not ids:
            raise ValidationError("the prompt is empty", param="prompt")
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise ValidationError(f"prompt_token_ids[{i}] = {t} is out of the vocabulary (size "
                                      f"{self.vocab_size})", param="prompt_token_ids")
        params.validate(self.vocab_size)
        P, M = len(ids), self.max_model_len
        if P >= M:
            raise ValidationError(f"the prompt has {P} tokens, which leaves no room for output within "
                                  f"max_model_len {M}", param="prompt")
        if params.max_tokens is not None and P + params.max_tokens > M:
            raise ValidationError(f"the prompt ({P} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                                  f"max_model_len ({M})", param="max_tokens")
        max_tokens = params.max_tokens if params.max_tokens is not None else M - P
        return ProcessedPrompt(text, ids, params, max_tokens)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    stream: bool = False) -> None:
        processed = prompt if isinstance(prompt, ProcessedPrompt) else \
            self.process_inputs(prompt, params if params is not None else self.default_sampling_params())
        self.add_processed(request_id, processed, stream)

    def add_processed(self, request_id: str, p: ProcessedPrompt, stream: bool = False) -> None:
        if request_id in self._states:
            raise ValidationError(f"request id {request_id!r} is already in use", param="request_id")
        n = p.params.n
        state = RequestState(request_id, p.prompt, p.prompt_token_ids)
        children = []
        for i in range(n):
            child_id = request_id if n == 1 else f"{i}_{request_id}"
            req = Request(child_id, p.prompt_token_ids, p.params, self.eos_token_ids, p.max_tokens,
                          parent_id=request_id, index=i)
            if p.params.seed is not None:
                req.generator = torch.Generator(device=self.device)
                req.generator.manual_seed((p.params.seed + i) % (1 << 64))
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
        if request_id in self._states:
            raise ValidationError(f"request id {request_id!r} is already in use", param="request_id")
        req = Request(request_id, p.prompt_token_ids, p.params, self.eos_token_ids, p.max_tokens)
        self.scheduler.admit_computed(req, num_computed_tokens)
        self._states[request_id] = RequestState(request_id, p.prompt, p.prompt_token_ids,
                                                [self.processor_factory(req, self.tokenizer)])
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
        out = self.scheduler.schedule()
        touched = set(self._dirty)
        self._dirty.clear()
        touched.update(r.parent_id for r in out.finished)
        if out.is_empty and not touched and self.scheduler.has_unfinished():
            raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting and "
                               f"{len(self.scheduler.running)} running requests")
        if not out.is_empty:
            sampled = self.runner.execute(out)
            changed = self.scheduler.update_from_output(out, {k: s.token_id for k, s in sampled.items()})
            for req in changed:
                state = self._states[req.parent_id]
                proc = state.processors[req.index]
                stop = proc.on_token(req.output_token_ids[-1], sampled[req.request_id])
                if stop is not None:
                    if req.is_finished:
                        req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
                    else:
                        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
                touched.add(req.parent_id)
        outputs = []
        for rid in touched:
            state = self._states.get(rid)
            if state is None:
                continue
            if state.finished or rid in self._streaming:
                outputs.append(state.output())
            if state.finished:
                del self._states[rid]
                self._streaming.discard(rid)
        return outputs

    def shutdown(self) -> None:
        """Abort everything and free the device memory held by the model, caches and graphs."""
        self.abort_request(list(self._states))
        self._states.clear()
        if self.runner is not None:
            self.runner.release()
            self.runner = None
