"""`kimi-linear chat`: an interactive, streaming chat, against a running server (--url) or offline.

Lines you type are user messages; the reply streams as it is generated. At a terminal the prompt uses
readline (line editing, arrow keys, history of this session). Ctrl-C while a reply streams cancels it
(the request is aborted: closing the offline stream aborts it in the engine, closing the HTTP stream
makes the server abort it); the partial reply stays in the conversation. At the prompt, Ctrl-D or
`/exit` quits, and so does a Ctrl-C that follows another Ctrl-C (the first one only prints a hint).
`/clear` starts over. `--quick "message"` sends one message and exits. Piped input is read line by
line without a prompt.

Cancelling is done by a SIGINT handler that only sets a flag while a reply streams; the reply loop
checks it after every engine step (the offline bot yields once per step, text or not), so the engine is
never interrupted inside a step. A second Ctrl-C during the same reply interrupts at once.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

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
        try:
            for chunk in stream:
                yield (chunk.choices[0].delta.content or "") if chunk.choices else ""
        finally:
            stream.close()  # an early close drops the connection: the server aborts the request


class _OfflineChat:
    def __init__(self, args):
        from kimi_linear.errors import ValidationError

        self.llm = make_llm(args)
        if self.llm.get_tokenizer() is None:
            raise ValidationError("offline chat needs a tokenizer in the checkpoint folder", param="model")
        self.params = sampling_params(args, self.llm)

    def reply(self, messages: list[dict]):
        """The new text after every engine step ("" when a step added none); closing it aborts the request."""
        shown = 0
        stream = self.llm.chat_stream(messages, self.params)
        try:
            for out in stream:
                text = out.outputs[0].text
                yield text[shown:]
                shown = max(shown, len(text))
        finally:
            stream.close()


CANCELLED = "[reply cancelled]"
EXIT_HINT = "(Ctrl-C again or Ctrl-D to exit)"


@contextlib.contextmanager
def cancel_on_sigint(cancel: threading.Event):
    """While inside: the first SIGINT sets `cancel`, a second raises KeyboardInterrupt. Outside: unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class ChatRepl:
    """The conversation loop. `bot.reply(messages)` yields text pieces; `read(prompt)` returns a line (without
    its newline) or raises EOFError (Ctrl-D / end of input) or KeyboardInterrupt (Ctrl-C at the prompt)."""

    def __init__(self, bot, system: str | None, read: Callable[[str], str], write: Callable[[str], None],
                 prompt: str = "> "):
        self.bot, self.read, self.write, self.prompt = bot, read, write, prompt
        self.base = [{"role": "system", "content": system}] if system else []
        self.history = list(self.base)
        self.cancel = threading.Event()
        self._interrupted = False  # the last thing the user did was a Ctrl-C

    def turn(self, text: str) -> bool:
        """Send one message and stream the reply; False when Ctrl-C cancelled it."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        self.cancel.clear()
        pieces: Iterator[str] = self.bot.reply(self.history)
        with cancel_on_sigint(self.cancel):
            try:
                for piece in pieces:
                    if self.cancel.is_set():  # text that arrived after the Ctrl-C is not shown
                        break
                    if piece:
                        parts.append(piece)
                        self.write(piece)
            except KeyboardInterrupt:  # a second Ctrl-C during the same reply
                self.cancel.set()
            finally:
                pieces.close()
        cancelled = self.cancel.is_set()
        self.write(f"\n{CANCELLED}\n" if cancelled else "\n")
        self.history.append({"role": "assistant", "content": "".join(parts)})
        self._interrupted = cancelled
        return not cancelled

    def loop(self) -> int:
        while True:
            try:
                line = self.read(self.prompt)
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                if self._interrupted:
                    self.write("\n")
                    return 0
                self._interrupted = True
                self.write(f"\n{EXIT_HINT}\n")
                continue
            self._interrupted = False
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/clear":
                self.history[:] = list(self.base)
                continue
            if cmd:
                self.turn(line)


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def _read_piped(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    bot = _RemoteChat(args) if args.url else _OfflineChat(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - input() gains line editing, arrow keys and history

    repl = ChatRepl(bot, args.system, input if interactive else _read_piped, _write, "> " if interactive else "")
    if args.quick is not None:
        repl.turn(args.quick)
        return 0
    return repl.loop()
