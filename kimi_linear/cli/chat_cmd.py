"""`kimi-linear chat`: an interactive, streaming chat, against a running server (--url) or offline.

Lines you type are user messages; the reply streams as it is generated. `/clear` starts over,
`/exit` (or Ctrl-D) quits. `--quick "message"` sends one message and exits.
"""

from __future__ import annotations

import argparse
import sys

from kimi_linear.cli.engine_args import add_engine_args
from kimi_linear.cli.generate_cmd import DEFAULT_MAX_TOKENS, add_sampling_args, make_llm, sampling_params


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (against a server with --url, else offline)")
    add_engine_args(p)
    p.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model", default=None, help="model name on the server (default: its first)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--quick", default=None, help="send one message, print the reply, exit")
    add_sampling_args(p)
    p.set_defaults(func=run)


class _RemoteChat:
    def __init__(self, args):
        import openai

        self.client = openai.OpenAI(base_url=args.url, api_key=args.api_key or "none")
        self.model = args.served_model or self.client.models.list().data[0].id
        self.args = args

    def reply(self, messages: list[dict]):
        a = self.args
        extra = {k: v for k, v in (("top_k", a.top_k), ("min_p", a.min_p), ("repetition_penalty",
                                                                           a.repetition_penalty),
                                   ("ignore_eos", a.ignore_eos or None)) if v is not None}
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, temperature=a.temperature,
            max_tokens=a.max_tokens if a.max_tokens is not None else DEFAULT_MAX_TOKENS,
            top_p=a.top_p, stop=a.stop, extra_body=extra or None)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


class _OfflineChat:
    def __init__(self, args):
        from kimi_linear.errors import ValidationError

        self.llm = make_llm(args)
        if self.llm.get_tokenizer() is None:
            raise ValidationError("offline chat needs a tokenizer in the checkpoint folder", param="model")
        self.params = sampling_params(args, self.llm)

    def reply(self, messages: list[dict]):
        shown = 0
        for out in self.llm.chat_stream(messages, self.params):
            text = out.outputs[0].text
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)


def run(args: argparse.Namespace) -> int:
    bot = _RemoteChat(args) if args.url else _OfflineChat(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        parts = []
        for piece in bot.reply(history):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        history.append({"role": "assistant", "content": "".join(parts)})

    if args.quick is not None:
        turn(args.quick)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/clear":
            history[:] = list(base)
            continue
        if line.strip():
            turn(line)
    return 0
