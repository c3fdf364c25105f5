"""Streamed text and stop strings of one sequence: `SequenceOutput.append(new_token_ids, stop_terminated)`.

The output side of stopping, with vLLM's semantics. Token-id stops (EOS unless ignore_eos,
stop_token_ids, min_tokens, max_tokens, max_model_len) are decided on the scheduler side
(`request.py`, `Request.check_stop`); this object only turns their outcome into text:
- `stop_terminated`: the token-id rules ended the sequence on the last new token (EOS or a stop id):
  its text is left out unless `include_stop_str_in_output`, and the held-back text is flushed;
- a stop string -> finish_reason "stop", stop_reason = the string; the text ends before it (or after
  it with `include_stop_str_in_output`); the earliest-ending match wins; a match must end in new text
  and does not count before min_tokens (`request.may_stop`, the same rule as for stop ids);
- any other end (length, abort, a grammar): `finish(reason)` flushes the held-back text.
`stop_reason` here is only ever a stop string: the stop id of a token-id stop is the Request's.

Streaming invariant: text once returned is never retracted. A suffix of the text that is a proper
prefix of some stop string is held back until it is resolved, and incomplete UTF-8 is held back by
the detokenizer, so a stop string split across tokens never leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kimi_linear.engine.detokenizer import IncrementalDetokenizer
from kimi_linear.engine.request import may_stop
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


@dataclass
class StepDelta:
    text: str  # new text to stream (may be "")
    token_ids: list[int]  # the new token ids kept (tokens after a stop string are dropped)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | the reason given to `finish` (e.g. "length", "abort")
    stop_reason: str | None = None  # the matched stop string


@dataclass
class SequenceOutput:
    params: SamplingParams
    tokenizer: object | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text returned so far
    finish_reason: str | None = None
    stop_reason: str | None = None

    def __post_init__(self):
        p = self.params
        self._stops = list(p.stop)
        self._detok = None
        if p.detokenize and self.tokenizer is not None:
            self._detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens,
                                                 p.spaces_between_special_tokens)
        elif self._stops:
            raise ValidationError("stop strings need detokenization (a tokenizer and detokenize=True)", param="stop")
        self._pending = ""  # decoded text not yet returned (a possible stop-string prefix)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> StepDelta:
        """Feed the tokens sampled for this sequence in one step (usually one). `stop_terminated`: the
        scheduler side stopped the sequence on the last of them (`Request.ended_on_stop_token`)."""
        if self.finished:
            raise RuntimeError("append() on a finished sequence")
        p = self.params
        kept: list[int] = []
        out: list[str] = []
        last = len(new_token_ids) - 1
        for i, t in enumerate(new_token_ids):
            kept.append(t)
            self.token_ids.append(t)
            if stop_terminated and i == last:
                if p.include_stop_str_in_output:
                    self._feed(t)
                out.append(self._flush_all())
                self._finish("stop", None)
                break
            before = len(self._pending)
            self._feed(t)
            if self._stops and may_stop(p, len(self.token_ids)) and self._match_stop(before):
                out.append(self._pending)
                self._pending = ""
                break
        if not self.finished:
            out.append(self._release())
        text = "".join(out)
        self.text += text
        return StepDelta(text, kept, self.finished, self.finish_reason, self.stop_reason)

    def finish(self, reason: str) -> StepDelta:
        """End the sequence for a reason decided elsewhere ("length", "abort", a grammar's "stop"), flushing
        the held-back text (a partial stop string, an incomplete character)."""
        if self.finished:
            return StepDelta("", [], True, self.finish_reason, self.stop_reason)
        text = self._flush_all()
        self.text += text
        self._finish(reason, None)
        return StepDelta(text, [], True, reason, None)

    # ------------------------------------------------------------------ internals
    def _finish(self, reason: str, stop_reason: str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def _feed(self, t: int) -> None:
        if self._detok is not None:
            self._pending += self._detok.push([t])

    def _flush_all(self) -> str:
        text = self._pending + (self._detok.flush() if self._detok is not None else "")
        self._pending = ""
        return text

    def _match_stop(self, before: int) -> bool:
        """Look for a stop string ending in the new text (pending[before:]); truncate pending at it."""
        text = self._pending
        best: tuple[int, int, str] | None = None  # (end, start, stop): earliest end, then longest
        for s in self._stops:
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            return False
        end, start, s = best
        self._pending = text[:end] if self.params.include_stop_str_in_output else text[:start]
        self._finish("stop", s)
        return True

    def _release(self) -> str:
        """Return the pending text except its longest suffix that is a proper prefix of a stop string."""
        text = self._pending
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        out, self._pending = text[:len(text) - hold], text[len(text) - hold:]
        return out
