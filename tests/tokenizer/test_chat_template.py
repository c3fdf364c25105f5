"""Chat templates: the default Kimi format token for token, checkpoint templates, message validation."""

from __future__ import annotations

import pytest

from kimi_linear.errors import ValidationError
from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat, validate_messages

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant provided by Moonshot-AI."},
    {"role": "user", "content": "Is 123 a prime?"},
    {"role": "assistant", "content": "No: 123 = 3 × 41."},
    {"role": "user", "content": [{"type": "text", "text": "And 127?"}, {"type": "text", "text": "Why?"}]},
]


def test_multi_turn_kimi_format_token_for_token(tok):
    text = render_chat(CONVERSATION, add_generation_prompt=True)
    expected = ("<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
                "<|im_user|>user<|im_middle|>Is 123 a prime?<|im_end|>"
                "<|im_assistant|>assistant<|im_middle|>No: 123 = 3 × 41.<|im_end|>"
                "<|im_user|>user<|im_middle|>And 127?\nWhy?<|im_end|>"
                "<|im_assistant|>assistant<|im_middle|>")
    assert text == expected
    sp = tok.special_tokens

    def seg(role_tok, role, content):
        return [sp[role_tok]] + tok.encode(role, allow_special=False) + [sp["<|im_middle|>"]] + \
            tok.encode(content, allow_special=False) + [sp["<|im_end|>"]]

    want = (seg("<|im_system|>", "system", "You are a helpful assistant provided by Moonshot-AI.")
            + seg("<|im_user|>", "user", "Is 123 a prime?")
            + seg("<|im_assistant|>", "assistant", "No: 123 = 3 × 41.")
            + seg("<|im_user|>", "user", "And 127?\nWhy?")
            + [sp["<|im_assistant|>"]] + tok.encode("assistant", allow_special=False) + [sp["<|im_middle|>"]])
    assert tok.encode(text) == want
    assert tok.bos_token_id not in want  # the Kimi format has no [BOS]


def test_generation_prompt_and_continue_final_message():
    msgs = CONVERSATION[:2]
    assert not render_chat(msgs, add_generation_prompt=False).endswith("<|im_middle|>")
    cont = render_chat(msgs + [{"role": "assistant", "content": "No, it is"}], add_generation_prompt=False,
                       continue_final_message=True)
    assert cont.endswith("<|im_assistant|>assistant<|im_middle|>No, it is")
    with pytest.raises(ValidationError, match="cannot both be set"):
        render_chat(msgs, add_generation_prompt=True, continue_final_message=True)


def test_tools_tool_calls_and_tool_role():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "functions.get_weather:0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = render_chat(msgs, tools=tools)
    assert text == ('<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
                    '"parameters":{"type":"object"}}}]<|im_end|>'
                    "<|im_user|>user<|im_middle|>weather?<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
                    '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
                    "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
                    "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>")


def test_checkpoint_template_is_used(tok):
    tmpl = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}{{ bos_token }}")
    assert render_chat(CONVERSATION[1:2], tmpl, bos_token="<s>") == "[user] Is 123 a prime?\n[assistant] <s>"
    assert render_chat(CONVERSATION[1:2], None) == render_chat(CONVERSATION[1:2], DEFAULT_CHAT_TEMPLATE)
    # templates may call raise_exception; a broken template is a clear error too
    with pytest.raises(ValidationError, match="chat template: no system"):
        render_chat(CONVERSATION[1:2], "{{ raise_exception('no system') }}")
    with pytest.raises(ValidationError, match="not valid jinja2") as e:
        render_chat(CONVERSATION[1:2], "{% for m in messages %}")
    assert e.value.param == "chat_template"


def test_chat_template_kwargs_reach_the_template():
    tmpl = "{% if thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    assert render_chat(CONVERSATION[1:2], tmpl, chat_template_kwargs={"thinking": True}) == "<think>Is 123 a prime?"
    with pytest.raises(ValidationError, match="cannot set"):
        render_chat(CONVERSATION[1:2], tmpl, chat_template_kwargs={"messages": []})


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
    ([{"role": "robot", "content": "hi"}], "role 'robot' is not one of"),
    ([{"role": "user", "content": 3}], "must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only 'text' parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"content\[0\].text must be a string"),
    (["hi"], "must be an object"),
    ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "needs a function with a name"),
])
def test_invalid_messages_are_validation_errors(messages, match):
    with pytest.raises(ValidationError, match=match) as e:
        validate_messages(messages)
    assert e.value.param == "messages"


def test_checkpoint_template_from_tokenizer_config(tmp_path, bpe_folder):
    import json
    import shutil

    from kimi_linear.loader.tokenizer import KimiTokenizer

    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(bpe_folder / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert KimiTokenizer.from_pretrained(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the separate file wins
    assert KimiTokenizer.from_pretrained(tmp_path).chat_template == "J"


def test_apply_chat_template_picks_request_then_checkpoint_then_default(tok):
    from kimi_linear.loader.chat_template import apply_chat_template

    msgs = CONVERSATION[1:2]
    assert tok.chat_template is None
    assert apply_chat_template(tok, msgs) == render_chat(msgs)
    assert apply_chat_template(tok, msgs, "{{ bos_token }}|{{ eos_token }}") == "[BOS]|<|im_end|>"

    class WithTemplate:
        chat_template, bos_token, eos_token = "ckpt:{{ messages[0]['content'] }}", "[BOS]", "<|im_end|>"

    assert apply_chat_template(WithTemplate(), msgs) == "ckpt:Is 123 a prime?"
    assert apply_chat_template(WithTemplate(), msgs, "req") == "req"
