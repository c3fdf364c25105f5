"""`kimi-linear bench serve` against the loopback server prints vLLM's metrics table."""

from __future__ import annotations

from kimi_linear.cli.main import main


def test_bench_serve_prints_table(server, capsys):
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", "test-key", "--num-prompts", "4",
               "--random-input-len", "8", "--random-output-len", "4", "--ignore-eos", "--max-concurrency", "2",
               "--vocab-size", "700"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("Serving Benchmark Result", "Successful requests:", "Request throughput (req/s):",
                 "Output token throughput (tok/s):", "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
                 "Mean TPOT (ms):", "Mean ITL (ms):", "Mean E2EL (ms):"):
        assert line in out, line
    assert f"{'Successful requests:':<40} 4" in out
    assert f"{'Total generated tokens:':<40} 16" in out


def test_bench_serve_chat_backend(server, capsys):
    rc = main(["bench", "serve", "--backend", "openai-chat", "--base-url", server.url, "--api-key", "test-key",
               "--num-prompts", "2", "--random-input-len", "6", "--random-output-len", "3", "--ignore-eos"])
    assert rc == 0
    assert f"{'Successful requests:':<40} 2" in capsys.readouterr().out
