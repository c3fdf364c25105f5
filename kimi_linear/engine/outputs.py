"""Outputs as vLLM users expect them, and the per-sequence output processor (the plug-in seam).

`RequestOutput` (one per prompt) holds `CompletionOutput`s (one per sampled sequence, n of them)
with vLLM's fields. Logprobs follow vLLM: per output token a dict token id -> `Logprob`, holding
the sampled token and the top `logprobs` tokens (raw model distribution).

The seam: the engine makes one `SequenceProcessor` per sequence through a factory
`(request, tokenizer) -> SequenceProcessor` (`LLMEngine(processor_factory=...)`). After every new
token the engine calls `on_token(token_id, sample)`; a processor that returns a stop reason (e.g.
the matched stop string) finishes the sequence at once with finish_reason "stop". `completion()`
builds the CompletionOutput. Stop strings, incremental detokenization and the like plug in by
subclassing; the default processor records logprobs and detokenizes the whole output at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_linear.engine.request import Request


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
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    num_preemptions: int = 0


class SequenceProcessor:
    """Default per-sequence processor: logprob bookkeeping and a full detokenization at the end."""

    def __init__(self, request: Request, tokenizer=None):
        self.request = request
        self.tokenizer = tokenizer
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.sampling_params.logprobs is not None else None

    def on_token(self, token_id: int, sample) -> str | None:
        """Record token `token_id` (sample: the runner's SampleResult). Return a stop reason to finish now."""
        self.cumulative_logprob += sample.logprob
        if self.logprobs is not None:
            entry: dict[int, Logprob] = {}
            for rank, (tid, lp) in enumerate(sample.top or [], 1):
                entry[tid] = Logprob(lp, rank, self._decode_one(tid))
            if token_id not in entry:
                entry = {token_id: Logprob(sample.logprob, sample.rank, self._decode_one(token_id)), **entry}
            self.logprobs.append(entry)
        return None

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
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=r.finish_reason, stop_reason=r.stop_reason)


@dataclass
class RequestState:
    """One user request: its prompt and the processors of its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    processors: list[SequenceProcessor] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(p.request.is_finished for p in self.processors)

    def output(self) -> RequestOutput:
        outs = sorted((p.completion() for p in self.processors), key=lambda c: c.index)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outs, self.finished,
                             num_preemptions=sum(p.request.num_preemptions for p in self.processors))
