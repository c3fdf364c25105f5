"""Training documents from a jsonl file: validation, tokenization and loss masks.

One JSON object per line (blank lines are skipped), either
- `{"text": "..."}`: pre-training text, or
- `{"messages": [{"role": ..., "content": ...}, ...]}` (optionally with `"tools": [...]`): a chat for
  supervised fine-tuning, rendered by the checkpoint's chat template, the loss on assistant tokens only.
Other keys (an id, a source) are ignored. Anything else is a `DataError` naming the file, the line and
the problem, raised before training starts.

A `Document` is `input_ids` with a `loss_mask` of the same length: `loss_mask[t]` says whether token t
is a target of the loss, i.e. predicted from token t - 1 (`train/packing.py` shifts it into labels).

Token conventions (those of the Kimi tokenizer, `loader/tokenizer.py`, whose `encode` adds no special
tokens, exactly as the engine, vLLM and transformers encode prompts for this model):
- text: `encode(text) + [eos]`, with eos the tokenizer's `eos_token` (`tokenizer_config.json`; the
  Kimi checkpoints' end-of-text / end-of-turn token, on which `generation_config.json` stops), so a model
  learns where documents end. No [BOS] is prepended: nothing that serves the model adds one (the Kimi
  chat templates emit none either), so training without it matches what the model sees when used.
  Every token but the first is a target.
- messages: the template's text with no [BOS] of ours (a template that wants one writes `bos_token`).
  Each assistant turn's span is found by rendering prefixes: the conversation up to the turn with the
  generation prompt (ends with the assistant header), then up to and including the turn (ends after
  its end-of-turn token). The text between the two is the turn: its content, tool calls and the
  end-of-turn token, never its role header. Both renderings must be prefixes of the whole conversation's
  rendering (otherwise the spans are ill-defined and the line is rejected). Each piece of text between
  span boundaries is tokenized separately, so no token straddles a boundary; with the Kimi templates
  the pieces meet at special tokens, where tokenization splits anyway, so the ids equal those of the
  whole text. Special-token strings become their ids, as when the engine encodes a rendered prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kimi_linear.errors import DataError, ValidationError
from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE, compile_template, validate_messages


@dataclass(frozen=True)
class Document:
    """One training document: token ids and, per token, whether it is a loss target."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"Document: {len(self.input_ids)} input_ids but {len(self.loss_mask)} loss_mask entries")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are targets (the first token never is: nothing predicts it)."""
        return sum(self.loss_mask[1:])


def load_documents(path: str | os.PathLike, tokenizer, chat_template: str | None = None,
                   max_tokens: int | None = None) -> list[Document]:
    """The documents of a jsonl file, in file order.

    tokenizer: the checkpoint's `KimiTokenizer` (`kimi_linear.loader.tokenizer.load_tokenizer`).
    chat_template: template source for `messages` lines (default: the tokenizer's, else
    `DEFAULT_CHAT_TEMPLATE`). max_tokens: the longest allowed document (the training sequence length).
    Raises DataError (file, line, problem) for anything that cannot be trained on."""
    path = os.fspath(path)
    if tokenizer is None:
        raise DataError("the checkpoint has no tokenizer (tiktoken.model), so text cannot be tokenized", file=path)
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens must be at least 2, got {max_tokens}", file=path)
    if not os.path.isfile(path):
        raise DataError("no such file" if not os.path.exists(path) else "not a file", file=path)
    renderer = _ChatRenderer(tokenizer, chat_template, path)
    docs: list[Document] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {e.start})", file=path, line=lineno) from None
            if not line.strip():
                continue
            doc = _parse_line(line, tokenizer, renderer, path, lineno)
            if max_tokens is not None and len(doc) > max_tokens:
                raise DataError(f"the document is {len(doc)} tokens long, more than the limit of {max_tokens} "
                                f"tokens (the sequence length); shorten or split it", file=path, line=lineno)
            docs.append(doc)
    if not docs:
        raise DataError("no documents: the file is empty or has only blank lines", file=path)
    return docs


# --------------------------------------------------------------------------- one line
def _parse_line(line: str, tokenizer, renderer: _ChatRenderer, path: str, lineno: int) -> Document:
    def bad(msg: str) -> DataError:
        return DataError(msg, file=path, line=lineno)

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object with 'text' or 'messages', got a JSON {_json_type(obj)}")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text and has_messages:
        raise bad("has both 'text' and 'messages'; a line is either pre-training text or a chat")
    if not has_text and not has_messages:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise bad(f"needs a 'text' (pre-training) or a 'messages' (chat) field; found keys: {keys}")
    if has_text:
        if "tools" in obj:
            raise bad("'tools' goes with 'messages', not with 'text'")
        return _text_document(obj["text"], tokenizer, bad)
    return renderer.document(obj["messages"], obj.get("tools"), bad)


def _text_document(text, tokenizer, bad) -> Document:
    if not isinstance(text, str):
        raise bad(f"'text' must be a string, got a JSON {_json_type(text)}")
    if not text:
        raise bad("'text' is empty")
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Document(ids, [False] + [True] * (len(ids) - 1))


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- chats
class _ChatRenderer:
    """Renders validated conversations with one compiled template and finds the assistant spans."""

    def __init__(self, tokenizer, chat_template: str | None, path: str):
        self.tokenizer = tokenizer
        self.source = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.path = path
        self._template = None
        self.bos = getattr(tokenizer, "bos_token", None) or ""
        self.eos = getattr(tokenizer, "eos_token", None) or ""

    def _compiled(self):
        if self._template is None:  # compiled on the first chat line: a text-only file never needs it
            try:
                self._template = compile_template(self.source)
            except ValidationError as e:
                raise DataError(str(e), file=self.path) from None
        return self._template

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool, bad) -> str:
        import jinja2

        try:
            return self._compiled().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos, eos_token=self.eos)
        except ValidationError as e:  # the template's raise_exception
            raise bad(str(e)) from None
        except jinja2.TemplateError as e:
            raise bad(f"the chat template failed to render this conversation: {e}") from None

    def document(self, messages, tools, bad) -> Document:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content} objects")
        try:
            msgs = validate_messages(messages)
        except ValidationError as e:
            raise bad(str(e)) from None
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise bad("'tools' must be a list of objects")
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            raise bad("the conversation has no assistant message, so nothing would be trained on")

        full = self._render(msgs, tools, False, bad)
        spans: list[tuple[int, int]] = []
        for i in turns:
            start = self._render(msgs[:i], tools, True, bad)
            end = self._render(msgs[:i + 1], tools, False, bad)
            prev = spans[-1][1] if spans else 0
            if not (full.startswith(start) and full.startswith(end) and end.startswith(start)
                    and len(start) >= prev):
                raise bad(f"the chat template does not render this conversation prefix by prefix (messages[{i}]), "
                          f"so the assistant tokens cannot be located")
            if len(end) == len(start):
                raise bad(f"the chat template renders assistant messages[{i}] as nothing")
            spans.append((len(start), len(end)))

        ids: list[int] = []
        mask: list[bool] = []
        pos = 0
        for a, b in spans:
            for piece, target in ((full[pos:a], False), (full[a:b], True)):
                if piece:
                    toks = self.tokenizer.encode(piece)
                    ids += toks
                    mask += [target] * len(toks)
            pos = b
        if pos < len(full):
            toks = self.tokenizer.encode(full[pos:])
            ids += toks
            mask += [False] * len(toks)
        return Document(ids, mask)
