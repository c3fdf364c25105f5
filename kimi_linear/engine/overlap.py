"""Async scheduling (`EngineConfig.async_scheduling`): the host prepares step t+1 while step t runs.

Each `LLMEngine.step()` completes one step t and returns its outputs, as with async scheduling off;
step t was launched by the previous call (or by this one when nothing is in flight). In this order:

1. schedule step t+1 and launch it (forward + sampling enqueued, no wait) while step t runs. A request
   sampled at step t holds a placeholder as its last token (`Request.append_placeholder`); its input
   id for t+1 is taken on the device from step t's sampled tokens (`ModelRunner.forward(inputs_from=)`);
2. resolve step t: wait for its tokens (the one sync point: an event after non-blocking copies into
   pinned memory), fill the placeholders, apply the stop rules (ids, stop strings, grammar), detokenize,
   build the outputs;
3. advance step t+1 on the host (`Scheduler.advance`: computed counts, snapshots, blocks, placeholders)
   and keep it in flight for the next call (the caller's own work on the outputs overlaps it too).

A request that finishes at step t (a stop token or string, found in 2.) was scheduled in step t+1 too:
that speculative token is computed and discarded (never appended; its blocks and slot are freed in 2.
and the next user of them is stream-ordered after step t+1). A request whose step-t token ends it by
length is not scheduled again (`Request.reached_length`). An abort between two calls drops the
token in flight, so a request ends with exactly the tokens its streamed outputs showed.

Exactness: every token value is the one the synchronous engine samples (greedy and seeded rows do not
depend on the batch; a seeded request draws once per launched step, the discarded one after its last).
Step t+1 is scheduled before step t is resolved only when nothing in it needs step t's token values on
the host (`can_overlap`); otherwise that call resolves step t first and schedules after it, exactly as
with async scheduling off: repetition / frequency / presence penalties and bad_words (the sampler reads
the previous tokens) and structured output (the grammar must accept the token before the next bitmask).
Then step t+1 is scheduled after step 2, and launched and resolved within the next call, exactly as with
async scheduling off, which runs every step this way: the same code path. A prefix-cache state snapshot at
the end of step t+1 of a block that holds step t's token is planned without its key and keyed when step
t+1 is advanced, after step t is resolved (`PrefixCache.commit`); if step t finished the request, the copy
is dropped, as the synchronous engine never runs that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_linear.engine.model_runner import LaunchedStep
from kimi_linear.engine.request import Request, RequestStatus
from kimi_linear.engine.scheduler import SchedulerOutput


@dataclass
class InflightStep:
    """A launched step: what was scheduled, the runner's pending results, and the requests that got a
    placeholder token when it was advanced."""
    out: SchedulerOutput
    launched: LaunchedStep
    placeholders: list[Request] = field(default_factory=list)


def needs_host_tokens(req: Request) -> bool:
    """Sampling the next token of `req` reads its previous token values on the host."""
    p = req.sampling_params
    return (req.matcher is not None or bool(p.bad_words_token_ids) or p.repetition_penalty != 1.0
            or bool(p.frequency_penalty) or bool(p.presence_penalty))


def can_overlap(step: InflightStep) -> bool:
    """The next step can be scheduled and launched before `step` is resolved, with the same token values.
    (A prefix-cache state snapshot at the end of the next step needs no token value when it is planned: a
    block ending with the token in flight is keyed once the token is read back, `PrefixCache.commit`.)"""
    return not any(req.status == RequestStatus.RUNNING and needs_host_tokens(req) for req in step.placeholders)
