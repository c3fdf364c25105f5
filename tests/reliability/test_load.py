"""Bounded load: 32 concurrent clients with mixed requests (chat and completions, streamed or not, n up to
3, stop strings, seeds, json_schema, logprobs) for 2 rounds: nothing lost, no 5xx, exact token counts,
seeded outputs equal across rounds, the engine and the gauges back to 0, memory bounded. The traffic is
`benchmarks/soak.py`'s, whose --smoke mode runs here first (against the same server, which warms it up)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import psutil
import pytest
from helpers import import_benchmark
from harness import LoopbackServer


@pytest.fixture(scope="module")
def soak():
    return import_benchmark("soak")


def check_report(rep: dict) -> None:
    assert rep["lost"] == 0 and rep["num_5xx"] == 0 and rep["num_problems"] == 0, (rep["statuses"], rep["problems"])
    assert rep["completed"] == rep["sent"], rep["statuses"]
    assert rep["tokens_exact"], {k: rep[k] for k in ("usage_prompt_tokens", "server_prompt_tokens",
                                                     "usage_completion_tokens", "server_generation_tokens")}
    assert not rep["leaks"], rep["gauges_after"]


def test_soak_smoke_then_32_clients_2_rounds(tiny_checkpoint, soak, tmp_path):
    srv = LoopbackServer(str(tiny_checkpoint), api_key=None, max_waiting=64)
    try:
        srv.wait_healthy()
        eng = srv.client.engine
        # benchmarks/soak.py --smoke against this server (it also warms it up: caches, grammar compiler)
        out = tmp_path / "soak.json"
        smoke = soak.main(["--smoke", "--url", srv.url, "--vocab-size", str(eng.vocab_size),
                           "--server-pid", str(os.getpid()), "--out", str(out)])
        check_report(smoke)
        assert smoke["sent"] == 16 and json.loads(out.read_text())["sent"] == 16 and len(smoke["memory"]) >= 2
        saved = json.loads(out.read_text())
        for key in ("sent", "completed", "lost", "cut", "num_5xx", "latency_p50_s", "latency_p99_s", "rss_mb",
                    "gpu_used_mb", "memory", "tokens_exact", "leaks", "startup_s", "total_s"):
            assert key in saved, key
        assert saved["rss_mb"] is not None and all("rss_mb" in m for m in saved["memory"])

        generated0 = eng.stats().num_generated_tokens
        rss0 = psutil.Process(os.getpid()).memory_info().rss
        rep = asyncio.run(soak.run_traffic(srv.url, 32, rounds=2, seed=1, vocab=eng.vocab_size, has_tokenizer=True,
                                           max_tokens=6, pid=os.getpid(), sample_every=5.0))
        rss1 = psutil.Process(os.getpid()).memory_info().rss
        print(f"load: sent {rep['sent']}, completed {rep['completed']}, lost {rep['lost']}, 5xx {rep['num_5xx']}, "
              f"completion tokens {rep['usage_completion_tokens']} (server {rep['server_generation_tokens']:.0f}), "
              f"seeded {rep['seeded_requests']} (mismatches {rep['seeded_mismatches']}), p50 "
              f"{rep['latency_p50_s']:.2f} s, p99 {rep['latency_p99_s']:.2f} s, RSS {rss0 / 2**20:.0f} -> "
              f"{rss1 / 2**20:.0f} MB, gauges after {rep['gauges_after']}")
        check_report(rep)
        assert rep["sent"] == 64
        assert eng.stats().num_generated_tokens - generated0 == rep["usage_completion_tokens"]
        assert rep["seeded_requests"] > 0 and rep["seeded_mismatches"] == 0
        assert srv.engine_idle(timeout=10) and srv.client.num_in_flight == 0
        # The CPU allocator warms up for a few hundred requests (RSS then stays flat: ~1.25 GB after ~400
        # requests of this mix); a leak of the size of a request's cache or outputs would pass this bound.
        assert rss1 - rss0 < 512 * 2**20, (rss0, rss1)

        # soak.py's --time-budget: a request still unanswered at the deadline is cut by the client (counted
        # apart, not lost) and the server aborts it when its connection closes
        cut = asyncio.run(soak.run_traffic(srv.url, 4, duration=0.5, seed=2, vocab=eng.vocab_size, has_tokenizer=True,
                                           max_tokens=400, deadline=time.perf_counter() + 1.5, sample_every=5.0))
        assert cut["cut"] > 0 and cut["lost"] == 0 and cut["num_5xx"] == 0, cut["statuses"]
        assert cut["tokens_exact"] is None or cut["cut"] == 0
        assert srv.engine_idle(timeout=30) and srv.client.num_in_flight == 0
    finally:
        srv.stop()
