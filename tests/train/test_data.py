"""load_documents: text and chat lines, the exact assistant-only loss masks, and every bad-data error.

The tokenizer is the `tiny` preset's (Kimi layout specials, the default Kimi chat template).
"""

from __future__ import annotations

import json

import pytest

from kimi_linear.errors import DataError
from kimi_linear.loader.chat_template import render_chat
from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.train.data import Document, load_documents

HEADERS = ("<|im_assistant|>", "<|im_user|>", "<|im_system|>", "<|im_middle|>")

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "tool", "content": "lookup: Paris", "tool_call_id": "t0"},
    {"role": "assistant", "content": "Paris, of course.\nIt is lovely."},
]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def write(tmp_path, lines, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def masked(doc: Document) -> list[int]:
    return [t for t, m in zip(doc.input_ids, doc.loss_mask) if m]


# --------------------------------------------------------------------------- text
def test_text_line(tmp_path, tok):
    text = "The quick brown fox jumps over the lazy dog. 你好"
    [doc] = load_documents(write(tmp_path, [{"text": text, "id": 7}]), tok)
    assert doc.input_ids == tok.encode(text) + [tok.eos_token_id]
    assert doc.loss_mask == [False] + [True] * (len(doc) - 1)
    assert tok.bos_token_id not in doc.input_ids  # no [BOS]: nothing that serves the model adds one


def test_blank_lines_skipped_order_kept(tmp_path, tok):
    path = write(tmp_path, [{"text": "one"}, "", "   ", {"text": "two"}, "\t"])
    docs = load_documents(path, tok)
    assert [tok.decode(d.input_ids[:-1]) for d in docs] == ["one", "two"]


# --------------------------------------------------------------------------- chat
def test_chat_mask_is_exactly_the_assistant_turns(tmp_path, tok):
    [doc] = load_documents(write(tmp_path, [{"messages": CHAT}]), tok)
    im_end = tok.special_tokens["<|im_end|>"]
    # template-independent: the targets are the tokens of each assistant content + its end-of-turn token
    expect = []
    for m in CHAT:
        if m["role"] == "assistant":
            expect += tok.encode(m["content"]) + [im_end]
    assert masked(doc) == expect
    # the ids are the whole rendered conversation, tokenized as the engine would
    assert doc.input_ids == tok.encode(render_chat(CHAT, tok.chat_template, add_generation_prompt=False))
    # no role header, and nothing of the system / user / tool turns, is a target
    header_ids = {tok.special_tokens[h] for h in HEADERS}
    assert not header_ids & set(masked(doc))
    # each run of targets starts right after an assistant header
    hdr = tok.encode("<|im_assistant|>assistant<|im_middle|>")
    for t in range(1, len(doc)):
        if doc.loss_mask[t] and not doc.loss_mask[t - 1]:
            assert doc.input_ids[t - len(hdr):t] == hdr
    assert doc.num_loss_tokens == len(expect)


def test_chat_tool_calls_and_assistant_first(tmp_path, tok):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}
    msgs = [{"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "add one"},
            {"role": "assistant", "content": None, "tool_calls": [call]}]
    [doc] = load_documents(write(tmp_path, [{"messages": msgs}]), tok)
    text = tok.decode(masked(doc))
    assert text == ("Hi there.<|im_end|><|tool_calls_section_begin|><|tool_call_begin|>c1"
                    "<|tool_call_argument_begin|>{\"a\": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    assert not doc.loss_mask[0]


def test_chat_tools_field_goes_to_the_template(tmp_path, tok):
    tools = [{"type": "function", "function": {"name": "add"}}]
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    [doc] = load_documents(write(tmp_path, [{"messages": msgs, "tools": tools}]), tok)
    assert tok.decode(doc.input_ids).startswith("<|im_system|>tool_declare<|im_middle|>")
    assert tok.decode(masked(doc)) == "y<|im_end|>"


PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:{{ '\\n' }}{{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:{{ '\\n' }}{% endif %}")


def test_chat_other_template(tmp_path, tok):
    """A template with plain-text headers: the spans come from the template, not from Kimi markers."""
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "hi again"}]
    [doc] = load_documents(write(tmp_path, [{"messages": msgs}]), tok, chat_template=PLAIN_TEMPLATE)
    eos = tok.eos_token_id
    assert masked(doc) == tok.encode("hi!") + [eos] + tok.encode("hi again") + [eos]
    assert tok.decode(doc.input_ids).startswith("### user:\nSay hi\n### assistant:\nhi!")


def test_chat_template_not_prefix_consistent(tmp_path, tok):
    # renders the last message differently: the prefixes are not prefixes of the whole
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %}!{% endif %}|{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match="prefix by prefix"):
        load_documents(write(tmp_path, [{"messages": msgs}]), tok, chat_template=odd)


def test_chat_template_syntax_error(tmp_path, tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="not valid jinja2"):
        load_documents(write(tmp_path, [{"messages": msgs}]), tok, chat_template="{% for %}")


# --------------------------------------------------------------------------- errors
GOOD = {"text": "fine"}
BAD_LINES = [
    pytest.param('{"text": "unterminated', "not valid JSON", id="invalid-json"),
    pytest.param('["text", "x"]', "got a JSON array", id="array"),
    pytest.param('"just a string"', "got a JSON string", id="string"),
    pytest.param({"text": "a", "messages": []}, "both 'text' and 'messages'", id="both-keys"),
    pytest.param({"prompt": "a", "completion": "b"}, "needs a 'text'", id="neither-key"),
    pytest.param({"text": 5}, "'text' must be a string, got a JSON number", id="text-not-string"),
    pytest.param({"text": ""}, "'text' is empty", id="empty-text"),
    pytest.param({"text": "a", "tools": []}, "'tools' goes with 'messages'", id="tools-with-text"),
    pytest.param({"messages": "hi"}, "non-empty list", id="messages-not-list"),
    pytest.param({"messages": []}, "non-empty list", id="messages-empty"),
    pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot' is not one of", id="bad-role"),
    pytest.param({"messages": [{"content": "x"}]}, "has no 'role'", id="no-role"),
    pytest.param({"messages": [{"role": "user"}]}, "has no 'content'", id="no-content"),
    pytest.param({"messages": [{"role": "user", "content": 3}]}, "content must be a string", id="content-type"),
    pytest.param({"messages": ["hi"]}, "must be an object", id="message-not-object"),
    pytest.param({"messages": [{"role": "user", "content": "x"}]}, "no assistant message", id="no-assistant"),
    pytest.param({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                  "tools": "add"}, "'tools' must be a list", id="tools-not-list"),
]


@pytest.mark.parametrize("line, problem", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, tok, line, problem):
    path = write(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as e:
        load_documents(path, tok)
    assert str(e.value).startswith(f"{path}:3: ")
    assert problem in str(e.value)
    assert e.value.file == path and e.value.line == 3
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_file_without_documents(tmp_path, tok, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no documents"):
        load_documents(path, tok)


def test_document_longer_than_limit(tmp_path, tok):
    text = "word " * 50
    n = len(tok.encode(text)) + 1
    path = write(tmp_path, [GOOD, {"text": text}])
    assert len(load_documents(path, tok, max_tokens=n)[1]) == n  # exactly the limit is fine
    with pytest.raises(DataError) as e:
        load_documents(path, tok, max_tokens=n - 1)
    assert str(e.value).startswith(f"{path}:2: ")
    assert f"{n} tokens long" in str(e.value) and f"limit of {n - 1} tokens" in str(e.value)


def test_missing_file_bad_utf8_no_tokenizer(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        load_documents(tmp_path / "nope.jsonl", tok)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        load_documents(path, tok)
    with pytest.raises(DataError, match="no tokenizer"):
        load_documents(write(tmp_path, [GOOD]), None)
