"""Tool calling for /v1/chat/completions: what a request's `tools` / `tool_choice` mean, and the answer's fields.

`plan_tools(...)` validates `tools` and `tool_choice` (vLLM's rules and messages; every mistake is a 400
naming the field) and decides the mode:
- `"none"` (the default without tools): no parsing; the tools are still rendered into the prompt;
- `"auto"` (the default with tools): the model may call; the output is parsed. It needs the server's
  `--enable-auto-tool-choice` and `--tool-call-parser`, else a 400 naming both flags (as vLLM);
- `"required"` or `{"type": "function", "function": {"name": ...}}`: forced. The output is
  constrained (a structural tag from the parser: one tool-call section, arguments from each function's
  JSON schema), so it always parses and the arguments validate. Forced calls need no flag; without
  `--tool-call-parser` the model's own format (kimi_k2) is used. A named function that is not in
  `tools` is a 400; a forced choice cannot be combined with response_format / structured_outputs.
`parallel_tool_calls=false` allows one call (later ones are dropped; forced: the grammar allows one).

While parsing, the engine keeps special tokens in the text (skip_special_tokens / spaces off) so the
parser sees the markers; the parser drops the other special tokens from the content when the request
asked to skip them. Call ids are `functions.NAME:IDX` (Kimi's form, the one its chat template renders
back), IDX numbering the calls of the whole conversation (the assistant `tool_calls` in `messages`
come first), which is what Kimi writes and what vLLM assigns to forced calls; the index the model wrote
is not trusted, so ids stay unique even when a model miscounts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams, StructuredOutputsParams
from kimi_linear.server.tool_parsers import (DEFAULT_TOOL_PARSER, StreamDelta, ToolParser, get_tool_parser)

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "forced"
    parser: ToolParser | None = None
    functions: tuple[dict, ...] = ()  # forced: the functions the output may call
    parallel: bool = True
    first_index: int = 0  # calls already made in the conversation (the first new call's IDX)

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def call_id(self, name: str, position: int) -> str:
        return self.parser.call_id(name, self.first_index + position)


# --------------------------------------------------------------------------- the request
def _functions(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise ValidationError("tools must be a list of {type: function, function: {...}} objects", param="tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValidationError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}',
                                  param=f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValidationError(f"tools[{i}].function.name must be a non-empty string",
                                  param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, (dict, bool)):
            raise ValidationError(f"tools[{i}].function.parameters must be a JSON schema object",
                                  param=f"tools[{i}].function.parameters")
        out.append(fn)
    return out


def _named(tool_choice: dict, functions: list[dict]) -> dict:
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    fn = tool_choice.get("function")
    if tool_choice.get("type", "function") != "function" or not isinstance(fn, dict):
        raise ValidationError(f"Invalid value for `tool_choice`: {json.dumps(tool_choice)}! {usage}",
                              param="tool_choice")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValidationError(f"Invalid value for `function.name` in `tool_choice`! {usage}", param="tool_choice")
    for f in functions:
        if f["name"] == name:
            return f
    raise ValidationError(f"The tool specified in `tool_choice` ({name!r}) does not match any of the specified "
                          f"`tools` ({', '.join(repr(f['name']) for f in functions)})", param="tool_choice")


def count_tool_calls(messages: list[dict]) -> int:
    """The tool calls the assistant already made in `messages`."""
    return sum(len(m.get("tool_calls") or []) for m in messages
               if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list))


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None, messages: list[dict], tokenizer,
               tool_call_parser: str | None, enable_auto_tool_choice: bool,
               parsers: dict | None = None) -> ToolPlan:
    """The request's tool mode (see the module docstring). `parsers`: a cache name -> ToolParser."""
    functions = _functions(tools) if tools is not None else []
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if tool_choice == "none":
        return ToolPlan("none")
    if tools is None:
        raise ValidationError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if tool_choice == "required" and not functions:
        return ToolPlan("none")  # vLLM: required with an empty tool list is none
    if not (tool_choice in ("auto", "required") or isinstance(tool_choice, dict)):
        raise ValidationError(f"Invalid value for `tool_choice`: {json.dumps(tool_choice)}! Only named tools, "
                              f'"none", "auto" or "required" are supported.', param="tool_choice")
    if tool_choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise ValidationError(AUTO_NEEDS_FLAGS, param="tool_choice")
    if tokenizer is None:
        raise ValidationError("tool calls need a tokenizer, and this model has none", param="tools")
    name = tool_call_parser or DEFAULT_TOOL_PARSER
    parsers = {} if parsers is None else parsers
    if name not in parsers:
        parsers[name] = get_tool_parser(name, tokenizer)
    parser = parsers[name]
    parallel = parallel_tool_calls is not False
    first = count_tool_calls(messages)
    if tool_choice == "auto":
        return ToolPlan("auto", parser, parallel=parallel, first_index=first)
    if isinstance(tool_choice, dict):
        return ToolPlan("forced", parser, (_named(tool_choice, functions),), parallel=False, first_index=first)
    return ToolPlan("forced", parser, tuple(functions), parallel=parallel, first_index=first)


def apply_plan(plan: ToolPlan, params: SamplingParams) -> bool:
    """Set up `params` for the plan; returns whether the content should drop special tokens."""
    strip = params.skip_special_tokens
    if not plan.parses:
        return strip
    if plan.mode == "forced":
        if params.structured_outputs is not None:
            raise ValidationError("tool_choice 'required' or a named function cannot be combined with "
                                  "response_format or structured_outputs", param="tool_choice")
        tag = plan.parser.structural_tag(list(plan.functions), plan.parallel)
        params.structured_outputs = StructuredOutputsParams(structural_tag=json.dumps(tag))
    params.skip_special_tokens = False
    params.spaces_between_special_tokens = False
    return strip


def reword_schema_error(e: ValidationError, plan: ToolPlan) -> ValidationError:
    """A forced plan's grammar error, said as the tools' problem (the client sent no structured_outputs)."""
    if plan.mode == "forced" and e.param == "structured_outputs":
        return ValidationError(f"tools: a function's parameters cannot be compiled into a grammar ({e})",
                               param="tools")
    return e


# --------------------------------------------------------------------------- the answer
def message_tool_calls(plan: ToolPlan, calls) -> list[dict]:
    """`message.tool_calls` of a whole answer."""
    return [{"id": plan.call_id(c.name, i), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


def delta_tool_calls(plan: ToolPlan, delta: StreamDelta) -> list[dict]:
    """`delta.tool_calls` of one chunk: a call's first delta has its index, id, type and name (arguments
    ""), later ones the index and argument text, as the OpenAI API streams them."""
    out = []
    for d in delta.tool_calls:
        if d.name is not None:
            out.append({"index": d.index, "id": plan.call_id(d.name, d.index), "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments}})
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out


def finish_reason(reason: str | None, called: bool) -> str | None:
    """"tool_calls" when the output called a tool and ended normally; a truncated one stays "length"."""
    return "tool_calls" if called and reason == "stop" else reason
