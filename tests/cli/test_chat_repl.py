"""The chat REPL: Ctrl-C (a real SIGINT) cancels the reply in flight and aborts its request, Ctrl-C twice or
Ctrl-D at the prompt exits, and at a terminal (a pty) the prompt has readline's history and arrow keys."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

from kimi_linear.cli.chat_cmd import CANCELLED, EXIT_HINT, ChatRepl, _OfflineChat
from kimi_linear.cli.main import build_parser


class _Script:
    """read(): the next scripted line, or raises the scripted exception (EOFError / KeyboardInterrupt)."""

    def __init__(self, *items):
        self.items = list(items)

    def __call__(self, prompt: str) -> str:
        item = self.items.pop(0)
        if isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException)):
            raise item
        return item


class _Bot:
    """Yields "w0 w1 ..." and sends this process a SIGINT (the user's Ctrl-C) after `interrupt_after` pieces."""

    def __init__(self, interrupt_after: int | None = None):
        self.interrupt_after = interrupt_after
        self.closed_after: list[int] = []
        self.seen: list[list[dict]] = []

    def reply(self, messages):
        self.seen.append([dict(m) for m in messages])
        n = 0
        try:
            for n in range(1, 200):
                yield f"w{n} "
                if n == self.interrupt_after:
                    os.kill(os.getpid(), signal.SIGINT)
        finally:
            self.closed_after.append(n)


def test_ctrl_c_cancels_the_reply_and_a_second_exits():
    out: list[str] = []
    bot = _Bot(interrupt_after=3)
    repl = ChatRepl(bot, None, _Script("hello", KeyboardInterrupt), out.append)
    assert repl.loop() == 0
    text = "".join(out)
    assert text.startswith("w1 w2 w3 \n" + CANCELLED)
    assert bot.closed_after == [4]  # closed at its next step (the request aborted)
    assert repl.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "w1 w2 w3 "}]
    assert EXIT_HINT not in text  # the Ctrl-C after a cancelled reply exits at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is only set during a reply


def test_ctrl_c_at_the_prompt_warns_then_exits_and_ctrl_d_exits():
    out: list[str] = []
    bot = _Bot()
    repl = ChatRepl(bot, "be brief", _Script(KeyboardInterrupt, "hi", KeyboardInterrupt, KeyboardInterrupt),
                    out.append)
    assert repl.loop() == 0
    text = "".join(out)
    assert text.count(EXIT_HINT) == 2 and CANCELLED not in text  # a line in between resets the count
    assert bot.seen[0][0] == {"role": "system", "content": "be brief"} and bot.closed_after == [199]
    out.clear()
    assert ChatRepl(_Bot(), None, _Script("/clear", EOFError), out.append).loop() == 0


def test_cancel_aborts_the_offline_request(tiny_checkpoint):
    args = build_parser().parse_args(["chat", str(tiny_checkpoint), "--device", "cpu", "--max-tokens", "300",
                                      "--ignore-eos", "--max-model-len", "512"])
    bot = _OfflineChat(args)
    steps = []
    inner = bot.reply

    def reply(messages):
        for piece in inner(messages):
            steps.append(piece)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield piece

    bot.reply = reply
    out: list[str] = []
    repl = ChatRepl(bot, None, _Script("hello", EOFError), out.append)
    assert repl.loop() == 0
    assert CANCELLED in "".join(out) and len(steps) == 3
    engine = bot.llm.llm_engine
    s = engine.stats()
    assert not engine.has_unfinished_requests() and s.num_blocks_used == 0 and s.num_slots_used == 0


def _read_until(fd: int, needle: bytes, timeout: float, buf: bytearray, start: int = 0) -> bool:
    """Read the pty into `buf` until `needle` shows up in buf[start:] (True) or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if needle in buf[start:]:
            return True
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf.extend(chunk)
    return needle in buf[start:]


def _controlling_tty() -> None:
    """In the child: a new session whose controlling terminal is the pty on stdin (so ^C sends SIGINT)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_terminal_session_with_readline_history(tiny_checkpoint):
    """A real pty: type a message, Ctrl-C its reply, recall it with the up arrow, Ctrl-C again, Ctrl-D."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_linear", "chat", str(tiny_checkpoint), "--device", "cpu",
                             "--max-model-len", "1024", "--max-tokens", "400", "--ignore-eos"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=_controlling_tty)
    os.close(slave)
    buf = bytearray()
    try:
        assert _read_until(master, b"> ", 120, buf), bytes(buf)
        os.write(master, b"tell me about kda\r")
        assert _read_until(master, b"tell me about kda\r\n", 30, buf)
        start = len(buf)
        deadline = time.time() + 60
        while len(buf) < start + 10 and time.time() < deadline:  # wait until the reply is streaming
            _read_until(master, b"\x00", 0.5, buf, start)
        os.write(master, b"\x03")  # Ctrl-C: cancel the reply
        assert _read_until(master, CANCELLED.encode(), 30, buf, start), bytes(buf[-300:])
        mark = buf.index(CANCELLED.encode(), start)
        assert _read_until(master, b"> ", 30, buf, mark)
        mark = len(buf)
        os.write(master, b"\x1b[A")  # up arrow: readline recalls the last message
        assert _read_until(master, b"tell me about kda", 10, buf, mark), bytes(buf[mark:])
        os.write(master, b"\r")  # and sends it again
        mark = len(buf)
        deadline = time.time() + 60
        while len(buf) < mark + 30 and time.time() < deadline:
            _read_until(master, b"\x00", 0.5, buf, mark)
        os.write(master, b"\x03")
        assert _read_until(master, CANCELLED.encode(), 30, buf, mark), bytes(buf[mark:])
        assert _read_until(master, b"> ", 30, buf, buf.index(CANCELLED.encode(), mark))
        os.write(master, b"\x04")  # Ctrl-D at the prompt: exit
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
