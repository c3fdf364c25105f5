"""Tool-call parsers by name (`--tool-call-parser`, vLLM's names): the registry and the server flags' check.

`get_tool_parser(name, tokenizer)` builds one; `TOOL_PARSERS` lists them. `DEFAULT_TOOL_PARSER`
(kimi_k2, the format every Kimi Linear checkpoint is trained on) serves `tool_choice="required"` and
named functions when no parser is configured: those need no flag, as in vLLM. `"auto"` needs both
`--enable-auto-tool-choice` and `--tool-call-parser` (`check_tool_flags` rejects the first without the
second at startup, as vLLM does).
"""

from __future__ import annotations

from kimi_linear.errors import ConfigError
from kimi_linear.server.tool_parsers.base import (ExtractedToolCalls, ParsedToolCall, StreamDelta, ToolCallDelta,
                                                  ToolCallStreamer, ToolParser)
from kimi_linear.server.tool_parsers.kimi_k2 import KimiK2ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {KimiK2ToolParser.name: KimiK2ToolParser}
DEFAULT_TOOL_PARSER = KimiK2ToolParser.name


def check_tool_flags(tool_call_parser: str | None, enable_auto_tool_choice: bool) -> None:
    """Raise ConfigError for an unknown parser name, or auto tool choice without a parser."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ConfigError("tool_call_parser", f"unknown tool-call parser {tool_call_parser!r}; available: "
                                              f"{', '.join(sorted(TOOL_PARSERS))}")
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ConfigError("enable_auto_tool_choice", "--enable-auto-tool-choice needs --tool-call-parser "
                                                     f"(available: {', '.join(sorted(TOOL_PARSERS))})")


def get_tool_parser(name: str, tokenizer) -> ToolParser:
    """The parser `name` over `tokenizer` (ValidationError if the tokenizer lacks the format's tokens)."""
    check_tool_flags(name, False)
    return TOOL_PARSERS[name](tokenizer)


__all__ = ["DEFAULT_TOOL_PARSER", "TOOL_PARSERS", "ExtractedToolCalls", "KimiK2ToolParser", "ParsedToolCall",
           "StreamDelta", "ToolCallDelta", "ToolCallStreamer", "ToolParser", "check_tool_flags", "get_tool_parser"]
