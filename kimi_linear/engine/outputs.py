"""Outputs as vLLM users expect them, and the per-sequence output processor (the plug-in seam).

`RequestOutput` (one per prompt) holds `CompletionOutput`s (one per sampled sequence, n of them)
with vLLM's fields. Logprobs follow vLLM: per output token a dict token id -> `Logprob`, holding
the sampled token and the top `logprobs` tokens (raw model distribution).

Prompt logprobs follow vLLM too: `RequestOutput.prompt_logprobs` is None unless asked for, else a
list with None for the first prompt token, then per prompt token a dict holding that token and the
top `prompt_logprobs` tokens.

The seam: the engine makes one `SequenceProcessor` per sequence through a factory
`(request, tokenizer) -> SequenceProcessor` (`LLMEngine(processor_factory=...)`). After every new
token the engine calls `on_token(token_id, sample)`; a processor that returns a stop reason (e.g.
the matched stop string) finishes the sequence at once with finish_reason "stop". `completion()`
builds the CompletionOutput. `SequenceProcessor` records logprobs and detokenizes the whole output
each time; `TextProcessor` (the engine's default) streams text through `stop_checker.SequenceOutput`:
incremental detokenization, stop strings held back until resolved, EOS / stop-id text left out. Token-id
stops are decided before `on_token` by the scheduler (`Request.check_stop`); processors only read them.
Invariant of every processor: `text()` only ever grows while the sequence runs (streaming clients
send `text[len(sent):]`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kimi_linear.engine.request import Request
from kimi_linear.engine.stop_checker import SequenceOutput


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (still running)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request passed each stage (`time.monotonic()` seconds, as vLLM's RequestMetrics): added to the
    engine, first scheduled (so queue time = first_scheduled_time - arrival_time), first and latest sampled
    token of any of its sequences, finished. None = not reached yet."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (usage.prompt_tokens_details.cached_tokens)


class SequenceProcessor:
    """Base per-sequence processor: logprob bookkeeping and a full detokenization of the output each time."""

    def __init__(self, request: Request, tokenizer=None):
        self.request = request
        self.tokenizer = tokenizer
        wants = request.sampling_params.logprobs is not None
        self.cumulative_logprob = 0.0 if wants else None  # as vLLM: only with logprobs requested
        self.logprobs: list[dict[int, Logprob]] | None = [] if wants else None
        # entries for prompt tokens 1.. (token 0 has none), filled while the prompt is prefilled
        self.prompt_logprobs: list[dict[int, Logprob]] | None = [] if request.wants_prompt_logprobs else None

    def on_token(self, token_id: int, sample) -> str | None:
        """Record token `token_id` (sample: the runner's SampleResult). Return a stop reason to finish now."""
        if self.logprobs is not None:
            self.cumulative_logprob += sample.logprob
            entry: dict[int, Logprob] = {}
            for rank, (tid, lp) in enumerate(sample.top or [], 1):
                entry[tid] = Logprob(lp, rank, self._decode_one(tid))
            if token_id not in entry:
                entry = {token_id: Logprob(sample.logprob, sample.rank, self._decode_one(token_id)), **entry}
            self.logprobs.append(entry)
        return None

    def on_prompt_logprobs(self, rows) -> None:
        """Append prompt-logprob rows (runner `PromptLogprobRow`s, in prompt order) as vLLM-style dicts."""
        for r in rows:
            entry = {tid: Logprob(lp, rank, self._decode_one(tid)) for rank, (tid, lp) in enumerate(r.top, 1)}
            if r.token_id not in entry:
                entry = {r.token_id: Logprob(r.logprob, r.rank, self._decode_one(r.token_id)), **entry}
            self.prompt_logprobs.append(entry)

    def prompt_logprobs_output(self) -> list | None:
        return None if self.prompt_logprobs is None else [None, *self.prompt_logprobs]

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None or not self.request.sampling_params.detokenize:
            return None
        return self.tokenizer.decode([token_id])

    def text(self) -> str:
        p = self.request.sampling_params
        if self.tokenizer is None or not p.detokenize:
            return ""
        return self.tokenizer.decode(self.request.output_token_ids, skip_special_tokens=p.skip_special_tokens)

    def completion(self) -> CompletionOutput:
        r = self.request
        return CompletionOutput(index=r.index, text=self.text(), token_ids=list(r.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob,
                                logprobs=list(self.logprobs) if self.logprobs is not None else None,
                                finish_reason=r.finish_reason, stop_reason=r.stop_reason)


class TextProcessor(SequenceProcessor):
    """Streamed text with stop strings: one `SequenceOutput` per sequence, fed token by token.

    The scheduler has already applied the token-id rules to the token (`Request.check_stop`); a stop on
    EOS / a stop id reaches `SequenceOutput` as `stop_terminated` (its text is left out). A stop string,
    which only the text reveals, is returned to the engine as the stop reason. When the request ended
    otherwise (length, abort, a grammar), the held-back text is flushed on the next `completion()`."""

    def __init__(self, request: Request, tokenizer=None):
        super().__init__(request, tokenizer)
        self.seq = SequenceOutput(request.sampling_params, tokenizer)

    def on_token(self, token_id: int, sample) -> str | None:
        super().on_token(token_id, sample)
        if self.seq.finished:
            return None
        return self.seq.append([token_id], self.request.ended_on_stop_token).stop_reason

    def text(self) -> str:
        r = self.request
        if r.is_finished and not self.seq.finished:
            self.seq.finish(r.finish_reason)  # flush what was held back (a partial stop string, a partial char)
        return self.seq.text


@dataclass
class RequestState:
    """One user request: its prompt and the processors of its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    processors: list[SequenceProcessor] = field(default_factory=list)
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return all(p.request.is_finished for p in self.processors)

    def output(self) -> RequestOutput:
        outs = sorted((p.completion() for p in self.processors), key=lambda c: c.index)
        plp = self.processors[0].prompt_logprobs_output() if self.processors else None
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outs, self.finished,
                             prompt_logprobs=plp,
                             num_preemptions=sum(p.request.num_preemptions for p in self.processors),
                             metrics=dataclasses.replace(self.metrics) if self.metrics is not None else None,
                             num_cached_tokens=min((p.request.num_cached_tokens or 0 for p in self.processors),
                                                   default=0))
