"""Per-sequence stop conditions and streamed text: `SequenceOutput.append(new_token_ids) -> StepDelta`.

One object per generated sequence owns its output token ids, the incremental detokenizer and the
stop logic, with vLLM's semantics:
- before `min_tokens` output tokens, EOS, `stop_token_ids` and stop strings do not stop (the sampler
  also masks EOS / stop ids then); `ignore_eos` disables EOS only;
- EOS -> finish_reason "stop", stop_reason None; a stop token id -> "stop", stop_reason = the id;
  their text is left out unless `include_stop_str_in_output`;
- a stop string -> "stop", stop_reason = the string; the text ends before it (or after it with
  `include_stop_str_in_output`); the earliest-ending match wins; a match must end in new text;
- `max_tokens` (the effective cap given by the engine) -> "length".

Streaming invariant: text once returned is never retracted. A suffix of the text that is a proper
prefix of some stop string is held back until it is resolved, and incomplete UTF-8 is held back by
the detokenizer, so a stop string split across tokens never leaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kimi_linear.engine.detokenizer import IncrementalDetokenizer
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


@dataclass
class StepDelta:
    text: str  # new text to stream (may be "")
    token_ids: list[int]  # the new token ids kept (tokens after a stop are dropped)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | the engine's own reason (e.g. "abort")
    stop_reason: str | int | None = None  # the matched stop string or stop token id; None for EOS


@dataclass
class SequenceOutput:
    params: SamplingParams
    tokenizer: object | None = None
    eos_token_ids: Iterable[int] = ()
    max_tokens: int | None = None  # effective cap (default: params.max_tokens)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text returned so far
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def __post_init__(self):
        p = self.params
        self.eos_token_ids = frozenset(self.eos_token_ids)
        self._stop_ids = frozenset(p.stop_token_ids)
        if self.max_tokens is None:
            self.max_tokens = p.max_tokens
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

    def append(self, new_token_ids: Sequence[int]) -> StepDelta:
        """Feed the tokens sampled for this sequence in one step (usually one)."""
        if self.finished:
            raise RuntimeError("append() on a finished sequence")
        p = self.params
        kept: list[int] = []
        out: list[str] = []
        for t in new_token_ids:
            kept.append(t)
            self.token_ids.append(t)
            n = len(self.token_ids)
            can_stop = n >= p.min_tokens
            if can_stop and ((t in self.eos_token_ids and not p.ignore_eos) or t in self._stop_ids):
                is_eos = t in self.eos_token_ids and not p.ignore_eos
                if p.include_stop_str_in_output:
                    self._feed(t)
                out.append(self._flush_all())
                self._finish("stop", None if is_eos else t)
                break
            before = len(self._pending)
            self._feed(t)
            if can_stop and self._stops and self._match_stop(before):
                out.append(self._pending)
                self._pending = ""
                break
            if self.max_tokens is not None and n >= self.max_tokens:
                out.append(self._flush_all())
                self._finish("length", None)
                break
        if not self.finished:
            out.append(self._release())
        text = "".join(out)
        self.text += text
        return StepDelta(text, kept, self.finished, self.finish_reason, self.stop_reason)

    def finish(self, reason: str) -> StepDelta:
        """End the sequence for an engine reason (e.g. "abort", or "length" at the context limit)."""
        if self.finished:
            return StepDelta("", [], True, self.finish_reason, self.stop_reason)
        text = self._flush_all()
        self.text += text
        self._finish(reason, None)
        return StepDelta(text, [], True, reason, None)

    # ------------------------------------------------------------------ internals
    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
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
