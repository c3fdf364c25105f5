"""`kimi-linear chat`: an interactive, streaming chat, against a running server (--url) or offline.

Lines you type are user messages; the reply streams as it is generated. `/clear` starts over,
`/exit` (or Ctrl-D) quits. `--quick "message"` sends one message and exits.
"""

from __future__ import annotations

import argparse
import sys

from kimi_linear.cli.engine_args import add_engine_args, engine_kwargs
from kimi_linear.cli.generate_cmd import add_sampling_args, sampling_params


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
            model=self.model, messages=messages, stream=True, max_tokens=a.max_tokens, temperature=a.temperature,
            top_p=a.top_p, stop=a.stop, extra_body=extra or None)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


class _OfflineChat:
    def __init__(self, args):
        from kimi_linear.engine.config import EngineConfig, default_sampling_kwargs
        from kimi_linear.engine.llm_engine import LLMEngine
        from kimi_linear.errors import ValidationError

        self.engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
        if self.engine.tokenizer is None:
            raise ValidationError("offline chat needs a tokenizer in the checkpoint folder", param="model")
        self.params = sampling_params(args, default_sampling_kwargs(self.engine.generation_config))
        self.n = 0

    def reply(self, messages: list[dict]):
        from kimi_linear.loader.chat_template import apply_chat_template

        prompt = apply_chat_template(self.engine.tokenizer, messages)
        self.n += 1
        self.engine.add_request(f"chat-{self.n}", prompt, self.params, stream=True)
        shown = 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
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
