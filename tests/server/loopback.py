"""A real server on loopback (uvicorn in a thread) over the tiny model on the CPU, for the server tests."""

from __future__ import annotations

import socket
import threading
import time

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model: str, api_key: str | None = API_KEY, max_waiting: int = 64, log_requests: bool = False,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False, **engine):
        import uvicorn

        from kimi_linear.server.launch import make_server

        kwargs = dict(model=model, device="cpu", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256)
        kwargs.update(engine)
        self.app, self.client = make_server(kwargs, ["tiny"], api_key=api_key, max_waiting=max_waiting,
                                            log_requests=log_requests, tool_call_parser=tool_call_parser,
                                            enable_auto_tool_choice=enable_auto_tool_choice)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = httpx.get(self.url + "/health")
            if r.status_code == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("server never became healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.shutdown()

    def engine_idle(self, timeout: float = 30) -> bool:
        """True once the engine holds no requests, MLA blocks or KDA slots."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            eng = self.client.engine
            s = eng.stats()
            if (not eng.has_unfinished_requests() and not s.num_running and not s.num_waiting
                    and s.num_blocks_used == 0 and s.num_slots_used == 0):
                return True
            time.sleep(0.05)
        return False




def serving(model: str, **kw):
    """A started RunningServer(model, **kw), stopped when the generator closes (for pytest fixtures)."""
    srv = RunningServer(model, **kw)
    srv.wait_healthy()
    yield srv
    srv.stop()


def openai_client(srv: RunningServer):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
