"""Servers for the reliability tests: one in a thread of the test process (`LoopbackServer`, any server
option), or the real CLI in a subprocess (`ServeProcess`: signals, exit codes, stderr)."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, timeout: float = 120) -> bool:
    """Poll `url`/health until it answers 200 (True) or `timeout` s pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def check_envelope(r: httpx.Response, status: int) -> dict:
    """The OpenAI error envelope of `r`, which must have `status`."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] != "server_error" or status >= 500, err
    return err


class LoopbackServer:
    """make_server + uvicorn in a daemon thread, on a free port of 127.0.0.1."""

    def __init__(self, model: str, api_key: str | None = API_KEY, max_waiting: int = 64,
                 max_request_body_bytes: int | None = 32 * 1024 * 1024, **engine):
        import uvicorn

        from kimi_linear.server.launch import make_server

        kwargs = dict(model=model, device="cpu", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256)
        kwargs.update(engine)
        options = dict(api_key=api_key, max_waiting=max_waiting)
        if "max_request_body_bytes" in inspect.signature(make_server).parameters:
            options["max_request_body_bytes"] = max_request_body_bytes
        self.app, self.client = make_server(kwargs, ["tiny"], **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("server never became healthy")

    def engine_idle(self, timeout: float = 30) -> bool:
        """True once the engine holds no requests, MLA blocks or KDA slots (polled up to `timeout` s)."""
        deadline = time.time() + timeout
        while True:
            eng = self.client.engine
            s = eng.stats()
            if (not eng.has_unfinished_requests() and not s.num_running and not s.num_waiting
                    and s.num_blocks_used == 0 and s.num_slots_used == 0):
                return True
            if time.time() > deadline:
                return False
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.shutdown()


class ServeProcess:
    """`python -m kimi_linear serve MODEL ...` in a subprocess (stdout and stderr to one log file)."""

    def __init__(self, model: str, log_path: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "kimi_linear", "serve", model, "--device", "cpu", "--port", str(self.port),
               "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
               "--served-model-name", "tiny", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}):\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serve never became healthy:\n{self.output()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
