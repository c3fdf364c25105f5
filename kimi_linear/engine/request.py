"""Request: one sequence the engine generates (a prompt with n > 1 fans out into n of them).

Invariants the scheduler and runner rely on:
- `num_tokens` = prompt + generated tokens; `num_computed_tokens` of them are in the caches. The
  tokens `[num_computed_tokens, num_tokens)` are what the next steps must compute; a step that brings
  `num_computed_tokens` to `num_tokens` yields logits from which the next token is sampled.
- While RUNNING the request owns `block_ids` (MLA cache blocks covering at least its computed tokens)
  and `state_slot` (its KDA states). WAITING requests own neither. Preemption frees both and sets
  `num_computed_tokens` back to 0; generated tokens are kept and recomputed with the prompt.
- This module is the one owner of the token-id stop rules (vLLM's engine-core `check_stop`):
  `stop_ids` (stop_token_ids, plus EOS unless ignore_eos), `may_stop` (min_tokens), `ids_to_mask`
  (the ids the sampler bans before min_tokens) and `Request.check_stop`, which the scheduler calls after
  each sampled token: EOS -> "stop" (stop_reason None), a stop id -> "stop" (stop_reason = the id),
  both checked before the length cap (max_tokens, max_model_len -> "length"). The mask applies while
  fewer than min_tokens tokens exist, so a sampled sequence has at least min_tokens tokens before its
  stop token. Stop strings are the output side's (`stop_checker.py`); it asks `may_stop` for
  min_tokens and `Request.ended_on_stop_token` to leave a stop token's text out.
- Prefix cache: a request may start RUNNING with `num_computed_tokens` > 0 (a hit: its first blocks
  are shared, cached ones and its slot restored from a snapshot). `block_hashes` depend on the tokens
  only, so they are kept across preemption; `num_cached_tokens` is the first admission's hit.
- Async scheduling (`engine/overlap.py`): a step launched before the previous one's tokens are known
  appends a placeholder (`PLACEHOLDER`, -1) for each sampled request (`append_placeholder`); it is always
  the last output token, at most one per request, and becomes the sampled token (`fill_placeholder`)
  before anything reads token values (stop rules, grammar, penalties, prefix hashes, outputs). Counts
  (`num_tokens`, `num_output_tokens`, min_tokens) include it; `reached_length` is the value-free part
  of `check_stop`, so a request whose in-flight token ends it by length is never scheduled again.
- `matcher` (structured output) has accepted exactly `output_token_ids`; preemption keeps it (the
  recompute samples no old token again). `num_prompt_logprobs` counts the prompt positions whose
  logprobs were computed (kept across preemption so none is computed twice).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from kimi_linear.sampling_params import SamplingParams


PLACEHOLDER = -1  # an output token still on the device (async scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the model produced non-finite logits for the sequence

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


# --------------------------------------------------------------------------- token-id stop rules
def stop_ids(params: SamplingParams, eos_token_ids: Iterable[int]) -> frozenset[int]:
    """The token ids that end a sequence: its `stop_token_ids`, plus the EOS ids unless `ignore_eos`."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


def may_stop(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a sequence with `num_output_tokens` output tokens (the new one included) may stop on a stop id,
    EOS or a stop string: not before `min_tokens`."""
    return num_output_tokens >= params.min_tokens


def ids_to_mask(params: SamplingParams, eos_token_ids: Iterable[int], num_output_tokens: int) -> frozenset[int]:
    """The stop ids the sampler sets to -inf for the next token of a sequence that has `num_output_tokens`
    output tokens so far: all of `stop_ids` while fewer than `min_tokens` were generated, else none."""
    if num_output_tokens >= params.min_tokens:
        return frozenset()
    return stop_ids(params, eos_token_ids)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), max_tokens: int | None = None,
                 parent_id: str | None = None, index: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # resolved max_tokens (None = until the context limit)
        self.max_tokens = sampling_params.max_tokens if max_tokens is None else max_tokens
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index  # position among the parent's n sequences
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.state_slot: int | None = None
        self.slot_epoch = 0  # changes each time the request gets a slot (runner-side tables key on it)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.generator: Any = None  # torch.Generator of a seeded request (set by the engine)
        self.matcher: Any = None  # structured-output GrammarMatcher of this sequence (set by the engine)
        self.num_placeholders = 0  # trailing output tokens still on the device (0 or 1; async scheduling)
        self.num_prompt_logprobs = 0  # prompt positions whose logprobs are computed (see wants_prompt_logprobs)
        # prefix cache (engine/prefix_cache.py)
        self.use_prefix_cache = True  # False: never looked up, indexed or snapshotted
        self.cache_extra_keys: tuple = ()  # hashed with every block (a future adapter id, a cache salt)
        self.block_hashes: list[bytes] = []  # hash of each full block of prompt + output, grown lazily
        self.num_registered_blocks = 0  # leading blocks of block_ids indexed by hash
        self.num_cached_tokens: int | None = None  # tokens found in the prefix cache at first admission
        self.snapshot_targets: list[int] = []  # block-aligned positions whose state is kept as a snapshot
        self.progress_snapshot: bytes | None = None  # key of this request's latest superseded-able snapshot

    # ------------------------------------------------------------------ token views
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token to compute (a prompt, or a prompt plus outputs after preemption)."""
        return self.num_uncomputed_tokens > 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """This sequence computes the prompt logprobs (the first of the n sequences of a request asking for them)."""
        return self.sampling_params.prompt_logprobs is not None and self.index == 0

    # ------------------------------------------------------------------ finishing
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def append_placeholder(self) -> None:
        """A token was sampled on the device and is not read back yet (async scheduling)."""
        if self.num_placeholders:
            raise RuntimeError(f"{self.request_id}: a second token in flight")
        self.output_token_ids.append(PLACEHOLDER)
        self.num_placeholders = 1

    def fill_placeholder(self, token_id: int | None) -> None:
        """The in-flight token became known (`token_id`), or is dropped (None: the request was aborted)."""
        if not self.num_placeholders:
            raise RuntimeError(f"{self.request_id}: no token in flight")
        if token_id is None:
            self.output_token_ids.pop()
        else:
            self.output_token_ids[-1] = token_id
        self.num_placeholders = 0

    def reached_length(self, max_model_len: int) -> bool:
        """The length cap (max_tokens, max_model_len) is reached: the part of `check_stop` that needs no
        token value."""
        return self.num_tokens >= max_model_len or (self.max_tokens is not None
                                                     and self.num_output_tokens >= self.max_tokens)

    def check_stop(self, max_model_len: int) -> bool:
        """After a token was appended: set a FINISHED status (and stop_reason) and return True if the request
        is done. EOS wins over a stop id equal to it (stop_reason None), and both over the length cap."""
        p = self.sampling_params
        if self._stopped_on_last_token():
            last = self.output_token_ids[-1]
            self.status = RequestStatus.FINISHED_STOPPED
            if p.ignore_eos or last not in self.eos_token_ids:
                self.stop_reason = last
            return True
        if self.reached_length(max_model_len):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    @property
    def ended_on_stop_token(self) -> bool:
        """The token-id rules stopped this request on its last token (EOS or a stop id), so the output side
        leaves that token's text out unless include_stop_str_in_output."""
        return self.status == RequestStatus.FINISHED_STOPPED and self._stopped_on_last_token()

    def _stopped_on_last_token(self) -> bool:
        return (bool(self.output_token_ids) and may_stop(self.sampling_params, self.num_output_tokens)
                and self.output_token_ids[-1] in stop_ids(self.sampling_params, self.eos_token_ids))

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_ids)}, slot={self.state_slot})")
