"""Chat-template rendering bounded in time and in size: a template (a request may send its own) can
neither hang a worker nor exhaust memory, and every way it fails is a TemplateLimitError.

- Size: the output is rendered in pieces and stops past `MAX_TEMPLATE_OUTPUT_CHARS`; before a string or
  list is built by `*` / `+` / `%`, or by a method or filter with a width argument (center, ljust, zfill,
  indent, wordwrap, format widths, replace, ...), its size is estimated and refused past the same
  bound; `**` refuses results of more than 65,536 bits.
- Time: while the template runs, a trace function (on the template's own frames only) checks a deadline
  at every line, so even a loop with an empty body stops after `RENDER_TIMEOUT_S`.

The environment is jinja2's immutable sandbox (no attribute writes, no unsafe attributes); the checks
here add what the sandbox does not bound.
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_OUTPUT_CHARS = 64 * 1024 * 1024  # rendered prompt, and any one string / list built on the way
RENDER_TIMEOUT_S = 10.0

_WIDE_FORMAT = re.compile(r"\d{9,}")  # a width / precision of 10**8 or more inside a format string
_GUARDED_FILTERS = ("center", "indent", "format", "replace", "wordwrap", "truncate", "batch", "slice")
_WIDTH_METHODS = frozenset(["center", "ljust", "rjust", "zfill", "expandtabs", "range"])


class TemplateLimitError(Exception):
    """The template went past the size or time bound."""


def _too_big(what: str, size: float) -> TemplateLimitError:
    return TemplateLimitError(f"{what} would be {size:.3g} characters / items, over the limit of "
                              f"{MAX_TEMPLATE_OUTPUT_CHARS}")


def _sized(x: Any) -> bool:
    return isinstance(x, (str, bytes, list, tuple))


def _check_ints(what: str, args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_OUTPUT_CHARS:
            raise _too_big(what, abs(a))


def _check_format(what: str, fmt: Any) -> None:
    if isinstance(fmt, str) and ("%" in fmt or "{" in fmt) and _WIDE_FORMAT.search(fmt):
        raise TemplateLimitError(f"{what}: a format width or precision of 10**8 or more is over the limit")


def _check_replace(s: Any, old: Any, new: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        count = s.count(old) if old else len(s) + 1
        size = len(s) + count * (len(new) - len(old))
        if size > MAX_TEMPLATE_OUTPUT_CHARS:
            raise _too_big("a replace", size)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in _GUARDED_FILTERS:
            if name in self.filters:
                self.filters[name] = _guard_filter(name, self.filters[name])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _sized(seq) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_OUTPUT_CHARS:
                    raise _too_big("a repetition", len(seq) * n)
        elif operator == "+":
            if _sized(left) and _sized(right) and len(left) + len(right) > MAX_TEMPLATE_OUTPUT_CHARS:
                raise _too_big("a concatenation", len(left) + len(right))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and right * math.log2(abs(left)) > 64 * 1024:
                raise TemplateLimitError(f"{left} ** {right} is too large a number")
        elif operator == "%" and isinstance(left, str):
            _check_format("a %-format", left)
            if "*" in left:  # widths taken from the arguments
                _check_ints("a %-format", right if isinstance(right, tuple) else (right,), {})
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        name = getattr(__obj, "__name__", "a call")
        if name in _WIDTH_METHODS:
            _check_ints(name, args, kwargs)
        # the bound method's string; jinja2 hands str.format over wrapped (`__wrapped__` is the bound method)
        owner = getattr(__obj, "__self__", None) or getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if name in ("format", "format_map"):
            _check_format(name, owner)
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1])
        return super().call(__context, __obj, *args, **kwargs)


def _guard_filter(name: str, fn):
    """`fn` with its arguments checked first (widths, format strings, replace sizes)."""
    skip = 1 if hasattr(fn, "jinja_pass_arg") else 0  # the context / environment argument jinja2 passes first

    def guarded(*args, **kwargs):
        own = args[skip:]
        if name == "format" and own:
            _check_format("the format filter", own[0])
            if isinstance(own[0], str) and "*" in own[0]:
                _check_ints("the format filter", own[1:], kwargs)
        elif name == "replace":
            if len(own) >= 3:
                _check_replace(own[0], own[1], own[2])
        else:
            _check_ints(f"the {name} filter", own[1:], kwargs)
        return fn(*args, **kwargs)

    if skip:
        guarded.jinja_pass_arg = fn.jinja_pass_arg  # keep jinja2's pass_context / pass_environment marker
    return guarded


def render_bounded(template, context: dict) -> str:
    """`template.render(**context)` within the size and time bounds (TemplateLimitError otherwise)."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_TEMPLATE_OUTPUT_CHARS:
                raise _too_big("the rendered prompt", size)
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)  # the trace function is this thread's only: other threads run untraced
