"""The tool-parser interface: what the chat server needs from a model's tool-call format.

A parser reads a model's raw output text (special tokens kept, no spaces around them) and separates
the assistant's text (`content`) from its tool calls. It parses incrementally (`streamer()`), and the
whole-output parse is the same streamer fed the whole text, so streamed and non-streamed answers agree
by construction. A call is `(name, arguments)` with the arguments as the model wrote them (JSON text,
not re-serialised), as vLLM returns them. It also builds the constraint that makes a model write calls
in its format (`structural_tag`), for `tool_choice="required"` or a named function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class ToolCallDelta:
    """New output of call `index` (0-based, in the order of the output): its name once (when first
    seen), then argument text to append."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def add_arguments(self, index: int, text: str) -> None:
        """Append argument text of call `index` (to its last delta here when that is the last one)."""
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == index:
            last.arguments += text
        else:
            self.tool_calls.append(ToolCallDelta(index, arguments=text))

    def extend(self, other: "StreamDelta") -> None:
        """`other` appended after this delta."""
        self.content += other.content
        for d in other.tool_calls:
            if d.name is None:
                self.add_arguments(d.index, d.arguments)
            else:
                self.tool_calls.append(ToolCallDelta(d.index, d.name, d.arguments))


@dataclass
class ParsedToolCall:
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    content: str  # the text outside tool-call sections ("" when there is none)
    tool_calls: list[ParsedToolCall]


class ToolCallStreamer(ABC):
    """Incremental parse of one output: `feed(new_text)` per step, `finish()` at the end."""

    @abstractmethod
    def feed(self, text: str) -> StreamDelta:
        """What the new text adds (a suffix that may be the start of a marker is held back)."""

    @abstractmethod
    def finish(self) -> StreamDelta:
        """The held-back rest, once the output is complete (a truncated call keeps its partial arguments)."""


class ToolParser(ABC):
    name: str

    @abstractmethod
    def streamer(self, strip_special_tokens: bool = True, max_calls: int | None = None) -> ToolCallStreamer:
        """A fresh incremental parser. `strip_special_tokens`: drop every special token's text from the
        content (what skip_special_tokens does without tool parsing); `max_calls`: calls after that many
        are dropped (1 for parallel_tool_calls=false)."""

    def extract(self, text: str, strip_special_tokens: bool = True, max_calls: int | None = None) -> ExtractedToolCalls:
        """The content and the calls of a whole output (the streamer fed the whole text)."""
        s = self.streamer(strip_special_tokens, max_calls)
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        for delta in (s.feed(text), s.finish()):
            content.append(delta.content)
            for d in delta.tool_calls:
                if d.name is not None:
                    calls.append(ParsedToolCall(d.name, ""))
                calls[d.index].arguments += d.arguments
        return ExtractedToolCalls("".join(content), calls)

    @abstractmethod
    def structural_tag(self, functions: list[dict], parallel: bool) -> dict:
        """An xgrammar structural tag (special tokens by name) under which the output is exactly one
        tool-call section calling the given `functions` (OpenAI function objects: name, parameters), one
        call or more (exactly one when not `parallel`), each call's arguments valid for its schema."""

    @abstractmethod
    def call_id(self, name: str, index: int) -> str:
        """The id of a call to `name` that is call number `index` of the conversation (0-based)."""
