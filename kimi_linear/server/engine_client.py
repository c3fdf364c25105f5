"""AsyncEngineClient: runs an LLMEngine in its own thread and serves it to asyncio code.

The engine (scheduler, pools, model) is touched only by the engine thread. The event loop talks to
it through a command queue (add, abort); the thread runs `engine.step()` while there is work and
hands each request's outputs back to that request's asyncio queue. Loading happens in the thread too,
so the server answers /health with 503 until the model is ready.

If a step raises, the engine is dead: every pending request gets an EngineDeadError, /health turns
503, new requests are refused with 503, and `died` is set (`serve` then stops the server and exits
non-zero, as vLLM does, so that a supervisor restarts it). A full waiting queue refuses new requests with 503. A request id already in flight is a 400.
Hooks feed the metrics and the startup log: `on_ready(engine)` once the model is loaded, `on_step(stats)`
after every engine step (the engine's `EngineStats`), `on_finished(output, times)` per finished request
(client-side arrival and streamed-token gaps; the engine's own timestamps are in `output.metrics`).

Admission: a streamed response must get its 503 before its 200, so handlers `admit` their request ids
(a place each, counted against the limit) before the response starts; `generate` takes the place over
and `release` frees the places of responses that never started. Shutdown: `begin_drain` refuses new
requests (503); `cut_all` ends every request still in flight with an EngineDeadError (its stream then
closes with an error event and [DONE]) and aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kimi_linear.errors import EngineDeadError, OverloadedError, ValidationError

logger = logging.getLogger(__name__)


@dataclass
class RequestTimes:
    """Client-side times of one request (`time.monotonic()`): arrival at the server, first and latest delivery
    that carried new tokens, and the gaps between such deliveries (streamed requests get one per step)."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    itls: list[float] = field(default_factory=list)
    tokens_seen: int = 0


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngineClient:
    def __init__(self, make_engine: Callable[[], object], max_waiting: int = 4096,
                 on_finished: Callable[[object, RequestTimes], None] | None = None,
                 on_step: Callable[[object], None] | None = None, on_ready: Callable[[object], None] | None = None):
        self._make_engine = make_engine
        self.engine = None
        self.max_waiting = max_waiting
        self._on_finished = on_finished
        self._on_step = on_step
        self._on_ready = on_ready
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._admitted: dict[str, _Stream] = {}  # places taken by `admit`, not yet used by `generate`
        self._draining: str | None = None  # why new requests are refused (the server is shutting down)
        self._times: dict[str, RequestTimes] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.dead: str | None = None
        self.died = threading.Event()  # set by a failed step after the model was ready (not by a failed load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kimi-linear-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        while not self.ready.wait(0.1 if timeout is None else min(0.1, timeout)):
            if self.dead is not None:
                return False
            if timeout is not None:
                timeout -= 0.1
                if timeout <= 0:
                    return False
        return self.dead is None

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and self.dead is None

    def stats(self):
        """The engine's `EngineStats` snapshot, or None while loading (or when loading failed)."""
        eng = self.engine
        if eng is None or not self.ready.is_set():
            return None
        return eng.stats()

    # ------------------------------------------------------------------ requests (event-loop side)
    def check_available(self, num_requests: int = 1) -> None:
        if self._draining is not None:
            raise EngineDeadError(self._draining)
        if self.dead is not None:
            raise EngineDeadError(f"the engine died: {self.dead}")
        if not self.ready.is_set():
            raise EngineDeadError("the model is still loading")
        if len(self._streams) + num_requests > self.max_waiting + self.engine.max_num_seqs:
            raise OverloadedError(f"the server is overloaded ({len(self._streams)} requests in flight); "
                                  f"retry later")

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._streams

    def admit(self, request_ids: list[str]) -> None:
        """Take a place for each request now (OverloadedError / EngineDeadError if none is free): what a
        streamed response does before it starts. `generate` uses the place; `release` gives it back."""
        self.check_available(len(request_ids))
        loop = asyncio.get_running_loop()
        with self._lock:
            for rid in request_ids:
                if rid in self._streams:
                    raise ValidationError(f"request id {rid!r} is already in use by a running request",
                                          param="X-Request-Id")
            for rid in request_ids:
                self._admitted[rid] = self._streams[rid] = _Stream(loop)
                self._times[rid] = RequestTimes(time.monotonic())

    def release(self, request_ids: list[str]) -> None:
        """Give back the places of admitted requests that never reached `generate`."""
        with self._lock:
            for rid in request_ids:
                if self._admitted.pop(rid, None) is not None:
                    self._streams.pop(rid, None)
                    self._times.pop(rid, None)

    @property
    def num_in_flight(self) -> int:
        """Requests admitted or running (their responses not finished)."""
        return len(self._streams)

    def begin_drain(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests from now on (503 with `reason`); those in flight go on."""
        self._draining = reason

    def cut_all(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) and abort it. Returns how many."""
        with self._lock:
            items = list(self._streams.items())
            self._streams.clear()
            self._times.clear()
            self._admitted.clear()
        for rid, st in items:
            self.abort(rid)
            st.put(EngineDeadError(reason))
        return len(items)

    async def generate(self, request_id: str, processed, stream: bool = True) -> AsyncIterator:
        """Yield the request's RequestOutputs as the engine produces them (the last one finished)."""
        with self._lock:
            st = self._admitted.pop(request_id, None)
        if st is None:
            self.check_available()
            st = _Stream(asyncio.get_running_loop())
            with self._lock:
                if request_id in self._streams:
                    raise ValidationError(f"request id {request_id!r} is already in use by a running request",
                                          param="X-Request-Id")
                self._streams[request_id] = st
                self._times[request_id] = RequestTimes(time.monotonic())
        self._commands.put(("add", request_id, processed, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # client went away or the consumer stopped: free the request's cache
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
        except BaseException as e:  # noqa: BLE001 - report any load failure as a dead engine
            self.dead = f"failed to load the model: {type(e).__name__}: {e}"
            logger.error("%s\n%s", self.dead, traceback.format_exc())
            return
        if self._on_ready is not None:
            self._hook(self._on_ready, self.engine)
        self.ready.set()
        eng = self.engine
        while not self._stopping:
            self._drain_commands()
            if not eng.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except BaseException as e:  # noqa: BLE001
                self._die(e)
                return
            now = time.monotonic()
            if self._on_step is not None:
                self._hook(self._on_step, eng.stats())
            for out in outputs:
                self._deliver(out, now)

    @staticmethod
    def _hook(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - metrics and logs must never kill the engine
            logger.exception("server hook %s failed", getattr(fn, "__name__", fn))

    def _drain_commands(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, processed, stream = cmd
                with self._lock:
                    st = self._streams.get(rid)
                if st is None:
                    continue
                try:
                    eng.add_processed(rid, processed, stream=stream)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    self._finish_stream(rid)
                    st.put(e)
            elif cmd[0] == "abort":
                rid = cmd[1]
                eng.abort_request(rid)

    def _deliver(self, out, now: float) -> None:
        rid = out.request_id
        with self._lock:
            st = self._streams.get(rid)
            t = self._times.get(rid)
        if st is None:
            return
        if t is not None:
            n = sum(len(c.token_ids) for c in out.outputs)
            if n > t.tokens_seen:
                if t.first_token is None:
                    t.first_token = now
                else:
                    t.itls.append(now - t.last_token)
                t.last_token = now
                t.tokens_seen = n
        st.put(out)
        if out.finished:
            self._finish_stream(rid)
            if self._on_finished is not None and t is not None:
                self._hook(self._on_finished, out, t)

    def _finish_stream(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)
            self._times.pop(rid, None)

    def _die(self, exc: BaseException) -> None:
        self.dead = f"{type(exc).__name__}: {exc}"
        logger.error("engine step failed; the engine is dead\n%s", traceback.format_exc())
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._times.clear()
        for st in streams:
            st.put(EngineDeadError(f"the engine died: {self.dead}"))
        self.died.set()
