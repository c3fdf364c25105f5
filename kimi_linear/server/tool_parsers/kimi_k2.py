"""The Kimi K2 / Kimi Linear tool-call format (`--tool-call-parser kimi_k2`).

A model answers with optional text, then one section of calls, each call's id `functions.NAME:IDX`
(IDX counts the calls of the conversation from 0) and its JSON arguments:

    text<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
    {"city": "Paris"}<|tool_call_end|>...<|tool_calls_section_end|>

Parsing rules (the streamer, `KimiK2Streamer`, is the one implementation; whole outputs are parsed by
feeding it everything), following vLLM's kimi_k2 parser where it defines one:
- text outside sections is content; a section may be spelt with the singular variants
  (`<|tool_call_section_begin|>`); stray markers outside a section are dropped from the content, and
  with `strip_special_tokens` every other special token's text too (what skip_special_tokens does);
- inside a section, text between calls is dropped; a call whose header (before
  `<|tool_call_argument_begin|>`) names no function, or that has no arguments marker, is dropped; the
  name is the header without `functions.` and `:IDX`; the arguments are the text up to
  `<|tool_call_end|>` (or the next call or the section end, when the model omits it), stripped of
  surrounding whitespace, streamed as they come;
- a suffix that may be the start of a marker (or of a dropped special token) is held back until the
  next text resolves it, so no marker ever leaks into content or arguments.

`structural_tag` forces exactly this layout with token-level markers, every call's arguments from its
function's JSON schema (the backend compiles schemas with the engine's whitespace policy).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kimi_linear.errors import ValidationError
from kimi_linear.server.tool_parsers.base import StreamDelta, ToolCallDelta, ToolCallStreamer, ToolParser

SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (*SECTION_BEGIN, *SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
TOKEN_MARKERS = (SECTION_BEGIN[0], SECTION_END[0], CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)  # special tokens
CALL_INDEX_PATTERN = r"0|[1-9][0-9]{0,3}"  # the IDX a forced call may write (the server numbers calls itself)
_HEADER = re.compile(r"\s*(?:functions\.)?(?P<name>.+?)(?::\d+)?\s*", re.DOTALL)

_TEXT, _SECTION, _HEADER_STATE, _ARGS = range(4)
_ENDS = {  # the markers that end each state's text
    _TEXT: SECTION_BEGIN,
    _SECTION: (CALL_BEGIN, *SECTION_END),
    _HEADER_STATE: (ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, *SECTION_END),
    _ARGS: (CALL_END, CALL_BEGIN, *SECTION_END),
}


class _Vocabulary:
    """The strings a streamer drops or waits for: a regex removing them, and every proper prefix."""

    def __init__(self, drop: Iterable[str]):
        names = sorted(set(drop) | set(MARKERS), key=len, reverse=True)
        self.drop = re.compile("|".join(re.escape(n) for n in names))
        self.prefixes = frozenset(n[:k] for n in names for k in range(1, len(n)))
        self.max_len = max(len(n) for n in names)

    def held(self, text: str) -> int:
        """Length of the longest suffix of `text` that may still grow into a marker or dropped name."""
        for k in range(min(len(text), self.max_len - 1), 0, -1):
            if text[-k:] in self.prefixes:
                return k
        return 0


def _find(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """(index, marker) of the earliest marker in `text`, or (-1, "")."""
    best, found = -1, ""
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, m
    return best, found


class KimiK2Streamer(ToolCallStreamer):
    def __init__(self, vocab: _Vocabulary, max_calls: int | None = None):
        self._v = vocab
        self._max_calls = max_calls
        self._buf = ""  # text not yet handled
        self._state = _TEXT
        self._header = ""
        self._num_calls = 0
        self._call: int | None = None  # the call whose arguments are streaming (None: dropped)
        self._args_started = False
        self._ws = ""  # trailing whitespace of the arguments, held until more arguments follow

    def feed(self, text: str) -> StreamDelta:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        return self._run(final=True)

    # ------------------------------------------------------------------ the state machine
    def _run(self, final: bool) -> StreamDelta:
        out = StreamDelta()
        while True:
            i, m = _find(self._buf, _ENDS[self._state])
            if i < 0:  # no marker yet: handle all but what may become one
                cut = len(self._buf) - (0 if final else self._v.held(self._buf))
                self._take(out, self._buf[:cut], end=final)
                self._buf = self._buf[cut:]
                return out
            self._take(out, self._buf[:i], end=True)
            self._buf = self._buf[i + len(m):]
            self._advance(out, m)

    def _take(self, out: StreamDelta, text: str, end: bool) -> None:
        """Text before the next marker (`end`: all of it, a marker or the output's end follows)."""
        if self._state == _TEXT:
            out.content += self._v.drop.sub("", text)
        elif self._state == _HEADER_STATE:
            self._header += text
        elif self._state == _ARGS:
            self._arguments(out, text, end)
        # _SECTION: text between calls is dropped

    def _advance(self, out: StreamDelta, marker: str) -> None:
        state = self._state
        if marker in SECTION_END:
            self._state = _TEXT
        elif marker == CALL_BEGIN:
            self._state, self._header = _HEADER_STATE, ""
        elif marker in SECTION_BEGIN:
            self._state = _SECTION
        elif marker == CALL_END:
            self._state = _SECTION
        elif marker == ARGUMENT_BEGIN:
            self._start_call(out)
            self._state = _ARGS
        if state == _ARGS:
            self._call = None

    def _start_call(self, out: StreamDelta) -> None:
        m = _HEADER.fullmatch(self._v.drop.sub("", self._header))
        name = m.group("name").strip() if m else ""
        self._call = None
        if name and (self._max_calls is None or self._num_calls < self._max_calls):
            self._call = self._num_calls
            self._num_calls += 1
            self._args_started, self._ws = False, ""
            out.tool_calls.append(ToolCallDelta(self._call, name=name))

    def _arguments(self, out: StreamDelta, text: str, end: bool) -> None:
        if self._call is None:
            return
        text = self._v.drop.sub("", text)
        if not self._args_started:
            text = text.lstrip()
            self._args_started = bool(text)
        text = self._ws + text
        kept = text.rstrip()
        self._ws = "" if end else text[len(kept):]
        if kept:
            out.add_arguments(self._call, kept)


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"

    def __init__(self, tokenizer):
        specials = dict(getattr(tokenizer, "special_tokens", None) or {})
        missing = [m for m in TOKEN_MARKERS if m not in specials]
        if missing:
            raise ValidationError(f"tool calls are unavailable: this model's tokenizer has no {', '.join(missing)} "
                                  f"token (the Kimi tool-call format needs them)", param="tools")
        self._strip_all = _Vocabulary(specials)
        self._markers_only = _Vocabulary(())

    def streamer(self, strip_special_tokens: bool = True, max_calls: int | None = None) -> KimiK2Streamer:
        return KimiK2Streamer(self._strip_all if strip_special_tokens else self._markers_only, max_calls)

    def structural_tag(self, functions: list[dict], parallel: bool) -> dict:
        def call(fn: dict) -> dict:
            schema = fn.get("parameters")
            return {"type": "tag", "begin": {"type": "token", "token": CALL_BEGIN},
                    "content": {"type": "sequence", "elements": [
                        {"type": "const_string", "value": f"functions.{fn['name']}:"},
                        {"type": "regex", "pattern": CALL_INDEX_PATTERN},
                        {"type": "token", "token": ARGUMENT_BEGIN},
                        {"type": "json_schema", "json_schema": schema if schema is not None else {"type": "object"}},
                    ]},
                    "end": {"type": "token", "token": CALL_END}}

        calls = {"type": "tags_with_separator", "tags": [call(fn) for fn in functions], "separator": "",
                 "at_least_one": True, "stop_after_first": not parallel}
        return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
            {"type": "token", "token": SECTION_BEGIN[0]}, calls, {"type": "token", "token": SECTION_END[0]}]}}

    def call_id(self, name: str, index: int) -> str:
        return f"functions.{name}:{index}"
