"""The event loop never freezes on big input: while a 16 MB body is decoded, validated, rendered and
tokenized (off the event loop, without long holds of the GIL), /health keeps answering in < 200 ms."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from harness import AUTH, LoopbackServer

MB16 = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def big_server(tiny_checkpoint):
    srv = LoopbackServer(str(tiny_checkpoint))  # the default 32 MiB body limit
    srv.wait_healthy()
    yield srv
    srv.stop()


def _text_body():
    words = "the quick brown fox jumps over a lazy dog, "
    return {"model": "tiny", "prompt": (words * (MB16 // len(words) + 1))[:MB16]}


def _ids_body():
    ids, size = [], 0
    while size < MB16:  # ~2.7M token ids
        ids.extend(range(100, 1000))
        size += 900 * 5
    return {"model": "tiny", "prompt": ids, "max_tokens": 1}


def _chat_body():
    return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": _text_body()["prompt"]}]}


CASES = [("/tokenize", _text_body, 200), ("/v1/completions", _ids_body, 400), ("/v1/chat/completions", _chat_body, 400)]


@pytest.mark.parametrize("path,make,status", CASES, ids=["tokenize-text", "completions-ids", "chat-text"])
def test_health_stays_fast_while_a_16mb_body_is_processed(big_server, path, make, status):
    body = json.dumps(make()).encode()
    assert len(body) >= MB16
    done = threading.Event()
    result = {}

    def big():
        t0 = time.perf_counter()
        r = httpx.post(big_server.url + path, content=body, headers={**AUTH, "content-type": "application/json"},
                       timeout=300)
        result.update(status=r.status_code, seconds=time.perf_counter() - t0, text=r.text[:300])
        done.set()

    with httpx.Client(timeout=30) as c:
        c.get(big_server.url + "/health")  # a warm connection: measure the server, not the TCP handshake
        worker = threading.Thread(target=big)
        worker.start()
        latencies = []
        while not done.is_set():
            t0 = time.perf_counter()
            assert c.get(big_server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
        worker.join()
    assert result["status"] == status, result
    assert result["seconds"] > 0.2 and len(latencies) >= 5, (result["seconds"], len(latencies))  # not vacuous
    worst = max(latencies)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    print(f"{path}: {len(body) / 1e6:.1f} MB in {result['seconds']:.2f} s; /health x{len(latencies)}, "
          f"p90 {p90 * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    # the client sends the 16 MB body from a thread of this same process (its GIL) on a 2-core machine
    # shared with the rest of the suite, so one probe may be delayed client-side: 90% of the probes under
    # 200 ms and none over 1 s (a frozen loop took 10-21 s per probe)
    assert p90 < 0.2, f"/health took {p90 * 1000:.0f} ms (90th percentile) while the body was processed"
    assert worst < 1.0, f"/health took {worst * 1000:.0f} ms while the body was processed"
