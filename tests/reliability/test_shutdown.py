"""SIGTERM / SIGINT drain the requests in flight: requests that finish within --shutdown-timeout
complete normally, the rest end with an error event and [DONE], new requests are refused, the server
exits normally (the CLI with 0) and logs no traceback. SIGTERM runs the real CLI in a subprocess;
SIGINT runs `serve` in this process's main thread (where signals are handled), which is quicker."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import httpx
from harness import ServeProcess, free_port, wait_for_health

LONG = {"model": "tiny", "prompt": [3, 4, 5, 6], "max_tokens": 1900, "ignore_eos": True, "stream": True}
DRAIN_S = 3.0


class Stream:
    """A streamed completion read in a thread: its events, and whether its first event arrived."""

    def __init__(self, url: str, body: dict):
        self.events: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url, body):
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.started.set()

    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events if e.startswith('{"id"')
                for c in json.loads(e)["choices"] if c.get("finish_reason")]

    def error_message(self) -> str | None:
        errs = [json.loads(e)["error"]["message"] for e in self.events if e.startswith('{"error"')]
        return errs[0] if errs else None


def drain_scenario(url: str, send_signal) -> dict:
    """Three long streams and a short one in flight, then the signal; returns what the clients saw."""
    longs = [Stream(url, LONG) for _ in range(3)]
    for s in longs:
        assert s.started.wait(60) and s.error is None, s.error
    short = Stream(url, {**LONG, "max_tokens": 3})
    assert short.started.wait(60) and short.error is None, short.error
    t0 = time.time()
    send_signal()
    time.sleep(0.5)
    try:  # the listener is closed; a request that still gets through is refused with 503
        late = httpx.post(url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 2}, timeout=10)
        late_status = late.status_code
    except httpx.TransportError:
        late_status = None
    for s in [*longs, short]:
        s.thread.join(timeout=DRAIN_S + 60)
    return {"longs": longs, "short": short, "late": late_status, "t0": t0}


def check_drained(seen: dict, elapsed: float) -> None:
    for s in [*seen["longs"], seen["short"]]:
        assert s.error is None, s.error
        assert s.events and s.events[-1] == "[DONE]", s.events[-3:]
    assert seen["short"].finish_reasons() == ["length"] and seen["short"].error_message() is None, seen["short"].events
    for s in seen["longs"]:
        msg = s.error_message()
        assert msg is not None and "shutting down" in msg, s.events[-3:]
    assert seen["late"] in (None, 503), seen["late"]
    assert DRAIN_S - 0.5 <= elapsed < DRAIN_S + 30, elapsed


def test_sigterm_drains_and_the_cli_exits_0(tiny_checkpoint, tmp_path):
    proc = ServeProcess(str(tiny_checkpoint), tmp_path / "serve.log", "--max-model-len", "2048",
                        "--shutdown-timeout", str(DRAIN_S))
    try:
        proc.wait_healthy()
        seen = drain_scenario(proc.url, lambda: proc.signal(signal.SIGTERM))
        code = proc.wait(timeout=DRAIN_S + 60)
        out = proc.output()
        check_drained(seen, time.time() - seen["t0"])
        assert code == 0, (code, out[-3000:])
        assert "Traceback" not in out and "CancelledError" not in out, out[-3000:]
    finally:
        proc.close()


def test_sigint_drains_without_tracebacks(tiny_checkpoint, caplog):
    from kimi_linear.server.launch import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seen: dict = {}

    def clients():
        wait_for_health(url)
        seen.update(drain_scenario(url, lambda: os.kill(os.getpid(), signal.SIGINT)))

    worker = threading.Thread(target=clients, daemon=True)
    worker.start()
    with caplog.at_level(logging.INFO):
        serve(dict(model=str(tiny_checkpoint), device="cpu", max_model_len=2048, max_num_batched_tokens=256),
              ["tiny"], port=port, shutdown_timeout=DRAIN_S, uvicorn_log_level="info")  # returns: no KeyboardInterrupt
    elapsed = time.time() - seen["t0"]
    worker.join(timeout=60)
    check_drained(seen, elapsed)
    assert not [r for r in caplog.records if r.exc_info or "CancelledError" in r.getMessage()], \
        [r.getMessage() for r in caplog.records if r.exc_info]
    assert any("ended 3 unfinished request(s)" in r.getMessage() for r in caplog.records)
