"""Chat templates: validate OpenAI-style messages and render them to a prompt string with jinja2.

The template comes from the checkpoint (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`, both read by `KimiTokenizer.from_pretrained`), from the request, or is
`DEFAULT_CHAT_TEMPLATE`: the Kimi framing of spec section 7.2, with no [BOS] and no injected system
prompt:

    <|im_system|>system<|im_middle|>...<|im_end|><|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|>...<|im_end|>   (tool / other roles: <|im_system|>{role})

Tools are declared as `<|im_system|>tool_declare<|im_middle|>{json}<|im_end|>` and assistant tool calls
use the K2 section markers. Templates render in a sandboxed jinja2 environment configured like
Hugging Face's (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, a non-ASCII `tojson`),
bounded in time and output size (`template_limits.py`); every way a template can fail is a
ValidationError (400), never a server error.

Invariant: every message reaching a template has a known `role` and a string `content` (text parts
joined with "\\n"; assistant messages with only tool calls have content "").
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from kimi_linear.errors import ValidationError

ROLES = ("system", "developer", "user", "assistant", "tool")

DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}<|im_system|>{{ role }}<|im_middle|>"
    "{%- endif -%}"
    "{%- if role == 'tool' and message.get('tool_call_id') -%}"
    "## Return of {{ message['tool_call_id'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- if role == 'assistant' and message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "<|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>"
    "{{- args if args is string else args | tojson }}<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


# --------------------------------------------------------------------------- validation
def _bad(msg: str) -> ValidationError:
    return ValidationError(msg, param="messages")


def _content_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise _bad(f"messages[{i}].content[{j}] must be an object with a 'type'")
            if part["type"] != "text":
                raise _bad(f"messages[{i}].content[{j}] has type {part['type']!r}; this model takes only "
                           f"'text' parts")
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}].text must be a string")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}")


def _check_tool_calls(i: int, calls: Any) -> None:
    if not isinstance(calls, list):
        raise _bad(f"messages[{i}].tool_calls must be a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"messages[{i}].tool_calls[{j}] needs a function with a name")
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            raise _bad(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")


def validate_messages(messages: Any) -> list[dict]:
    """Checked copies of `messages` with `content` as a string. Raises ValidationError(param="messages")."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise _bad(f"messages[{i}] has no 'role'")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        m = dict(m)
        if role == "assistant" and m.get("tool_calls") is not None:
            _check_tool_calls(i, m["tool_calls"])
            m["content"] = "" if m.get("content") is None else _content_text(i, m["content"])
        elif "content" not in m or m["content"] is None:
            raise _bad(f"messages[{i}] ({role}) has no 'content'")
        else:
            m["content"] = _content_text(i, m["content"])
        out.append(m)
    return out


# --------------------------------------------------------------------------- rendering
def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ValidationError(f"chat template: {message}", param="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled jinja2 template (cached). Raises ValidationError(param="chat_template") if it is invalid."""
    import jinja2

    from kimi_linear.loader.template_limits import BoundedEnvironment

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValidationError(f"chat template is not valid jinja2 (line {e.lineno}): {e.message}",
                              param="chat_template") from None
    except (RecursionError, MemoryError) as e:
        raise ValidationError(f"chat template is too deeply nested or too large to compile ({type(e).__name__})",
                              param="chat_template") from None


def render_chat(messages: Any, template: str | None = None, *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict] | None = None,
                bos_token: str = "", eos_token: str = "", chat_template_kwargs: dict | None = None) -> str:
    """The prompt string for `messages` under `template` (None: DEFAULT_CHAT_TEMPLATE).

    `continue_final_message` leaves the last (assistant) message open for the model to continue; it
    excludes `add_generation_prompt`."""
    import jinja2

    from kimi_linear.loader.template_limits import TemplateLimitError, render_bounded

    msgs = validate_messages(messages)
    if continue_final_message and add_generation_prompt:
        raise ValidationError("continue_final_message and add_generation_prompt cannot both be set",
                              param="continue_final_message")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValidationError("tools must be a list of objects", param="tools")
    kwargs = dict(chat_template_kwargs or {})
    reserved = {"messages", "tools", "add_generation_prompt"} & kwargs.keys()
    if reserved:
        raise ValidationError(f"chat_template_kwargs cannot set {sorted(reserved)}", param="chat_template_kwargs")
    tmpl = compile_template(template if template is not None else DEFAULT_CHAT_TEMPLATE)
    context = {"bos_token": bos_token, "eos_token": eos_token, **kwargs, "messages": msgs, "tools": tools,
               "add_generation_prompt": add_generation_prompt}
    try:
        text = render_bounded(tmpl, context)
    except ValidationError:  # the template's raise_exception()
        raise
    except jinja2.TemplateError as e:
        raise ValidationError(f"chat template failed to render: {e}", param="chat_template") from None
    except TemplateLimitError as e:
        raise ValidationError(f"chat template: {e}", param="chat_template") from None
    except MemoryError:
        raise ValidationError("chat template ran out of memory while rendering", param="chat_template") from None
    except Exception as e:  # noqa: BLE001 - any failure of a template is the template's (include without a
        # loader, a type error inside an expression, a recursion): a 400 naming it, never a 500
        raise ValidationError(f"chat template failed to render: {type(e).__name__}: {e}",
                              param="chat_template") from None
    if continue_final_message:
        final = msgs[-1]["content"].strip()
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise ValidationError("continue_final_message: the final message's content does not appear in the "
                                  "rendered prompt", param="continue_final_message")
        text = text[:cut + len(final)]
    return text


def apply_chat_template(tokenizer, messages: Any, chat_template: str | None = None, **kwargs) -> str:
    """`render_chat` with the template chosen as the engine should: the request's `chat_template`, else the
    checkpoint's (`tokenizer.chat_template`), else DEFAULT_CHAT_TEMPLATE; bos/eos from the tokenizer."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    return render_chat(messages, template, bos_token=getattr(tokenizer, "bos_token", None) or "",
                       eos_token=getattr(tokenizer, "eos_token", None) or "", **kwargs)
