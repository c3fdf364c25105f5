"""What a model step hands back: `SampleResult` per sampled request, `PromptLogprobRow`s, `StepResult`;
`PendingSample` (one step's tokens on the device, and their asynchronous copy to the host behind an event)
and `LaunchedStep` (a step whose forward and sampling are enqueued), which async scheduling overlaps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_linear.engine.sampler import SamplerOutput


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # raw logprob of the sampled token (None: no request of the step asked for logprobs)
    top: list[tuple[int, float]] | None = None  # (token id, logprob) of the top `logprobs`, best first
    rank: int | None = None  # rank of the sampled token in the raw distribution (1 = top), if logprobs
    is_finite: bool = True  # False: the logits held NaN / inf, the token means nothing


@dataclass
class PromptLogprobRow:
    token_id: int  # the prompt token this position predicts
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob) of the top `prompt_logprobs`, best first


@dataclass
class StepResult:
    sampled: dict[str, SampleResult]  # request id -> its new token (requests whose step reached their end)
    prompt_logprobs: list[tuple[object, list[PromptLogprobRow]]]  # (request, rows from its first new position)


class PendingSample:
    """The tokens sampled in one step: on the device at once (`token_ids` [R], which the next step may take
    as its inputs, `rows`: request id -> row) and on their way to the host (asynchronous copies into pinned
    memory, then an event); `results()` waits for the copies only, not for later work on the stream."""

    def __init__(self, requests: list, so: SamplerOutput | None, finite: torch.Tensor | None, device: torch.device):
        self.requests = requests
        self.rows = {r.request_id: i for i, r in enumerate(requests)}
        self.token_ids = so.token_ids if so is not None else None
        self._results: dict[str, SampleResult] | None = None if requests else {}
        if not requests:
            return
        ranks = so.ranks if so.ranks is not None else torch.zeros_like(so.token_ids)
        self._has_ranks = so.ranks is not None
        # two copies: the integers (token, rank, finite) in one [3, R] tensor, the logprobs in another
        self._ints = torch.stack([so.token_ids, ranks, finite.to(torch.int64)]).to("cpu", non_blocking=True)
        self._lps = so.logprobs.to("cpu", non_blocking=True) if so.logprobs is not None else None
        self._top = None
        if so.top_ids is not None:
            self._top = (so.top_ids.to("cpu", non_blocking=True), so.top_logprobs.to("cpu", non_blocking=True))
        self._event = None
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def results(self) -> dict[str, SampleResult]:
        """request id -> SampleResult (the one sync point of a step: waits for the copies to the host)."""
        if self._results is None:
            if self._event is not None:
                self._event.synchronize()
            tokens, ranks, finite = self._ints.tolist()
            lps = self._lps.tolist() if self._lps is not None else [None] * len(self.requests)
            top_ids, top_lps = (self._top[0].tolist(), self._top[1].tolist()) if self._top is not None else (None, None)
            results = {}
            for i, r in enumerate(self.requests):
                k = r.sampling_params.logprobs
                top = list(zip(top_ids[i][:k], top_lps[i][:k])) if (k and top_ids is not None) else None
                results[r.request_id] = SampleResult(tokens[i], lps[i], top, ranks[i] if self._has_ranks else None,
                                                     is_finite=bool(finite[i]))
            self._results = results
        return self._results


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are enqueued; its tokens come back through `sample`."""
    sample: PendingSample
    prompt_logprobs: list[tuple[object, list[PromptLogprobRow]]]

    def result(self) -> StepResult:
        return StepResult(self.sample.results(), self.prompt_logprobs)
