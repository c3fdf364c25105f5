"""Issue 16, item 8: the decode token gap under a concurrent long prefill, measured (benchmarks/mixed_latency.py
--smoke on the CPU): with the decode rows of the mixed steps on the decode kernels, the gap is smaller than
through the all-chunked path of before, and the decode requests' greedy tokens are the same both ways.

The bound is on this process's CPU time per gap (the wall clock of a shared CI machine is noise), with a wide
margin: the smoke run (8 decodes at a 128-token context beside a 256-token prompt) measures 3.4-3.7x, the
test asks for 1.5x."""

from __future__ import annotations

import json

import pytest
from helpers import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("mixed_latency")


def test_decode_gap_under_a_long_prefill_is_smaller_with_the_split(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    out = tmp_path / "mixed.json"
    result = bench.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["tokens_equal"] is True
    assert result["tokens_equal"]
    chunked, split = result["modes"]["chunked"], result["modes"]["split"]
    window = -(-256 // (72 - 8))  # the smoke prompt's chunks beside 8 decodes
    assert chunked["mixed_steps"] == split["mixed_steps"] == window
    for r in result["rounds"]["split"] + result["rounds"]["chunked"]:
        # every decode request got a token in every mixed step (async scheduling: and in the step that reads the
        # long prompt's token back)
        assert r["num_gaps"] == 8 * (window + int(r["async_scheduling"]))
    assert result["chunked_over_split"]["gap_p50_cpu"] > 1.5, result["modes"]
    assert split["ttft_cpu_ms"] < chunked["ttft_cpu_ms"]
