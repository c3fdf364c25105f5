"""`kimi-linear bench serve` against the loopback server: vLLM's metrics table, strict JSON results,
goodput SLOs, the progress bar, and the random / prefix-repetition / sharegpt datasets."""

from __future__ import annotations

import argparse
import json

import pytest

from kimi_linear.cli.bench_serve import build_requests
from kimi_linear.cli.main import build_parser, main

AUTH = {"Authorization": "Bearer test-key"}


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


BASE = ["bench", "serve", "--api-key", "test-key", "--num-prompts", "3", "--random-input-len", "6",
        "--random-output-len", "3", "--ignore-eos"]


def _args(**kw) -> argparse.Namespace:
    ns = build_parser().parse_args(["bench", "serve"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def _strict(text: str):
    def bad(name):
        raise AssertionError(f"{name} in the result JSON")
    return json.loads(text, parse_constant=bad)


def test_saved_result_is_strict_json(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main([*BASE, "--base-url", server.url, "--save-result", "--result-filename", str(out)])
    assert rc == 0
    data = _strict(out.read_text())
    assert data["request_rate"] is None and data["args"]["request_rate"] is None  # inf is null
    assert data["completed"] == 3 and data["total_output_tokens"] == 9


def test_goodput_and_progress_bar(server, capsys):
    rc = main([*BASE, "--base-url", server.url, "--goodput", "ttft:600000", "e2el:600000", "tpot:600000"])
    cap = capsys.readouterr()
    assert rc == 0
    thr = float(cap.out.split("Request throughput (req/s):")[1].split()[0])
    good = float(cap.out.split("Request goodput (req/s):")[1].split()[0])
    assert good == thr > 0
    assert "3/3" in cap.err  # tqdm's bar on stderr
    rc = main([*BASE, "--base-url", server.url, "--goodput", "ttft:0", "--disable-tqdm"])
    cap = capsys.readouterr()
    assert float(cap.out.split("Request goodput (req/s):")[1].split()[0]) == 0.0 and "3/3" not in cap.err


@pytest.mark.parametrize("slo", ["latency:5", "ttft", "ttft:-1", "ttft:abc"])
def test_bad_goodput_is_a_clear_error(server, slo):
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--base-url", server.url, "--goodput", slo])
    assert "--goodput" in str(e.value) and slo in str(e.value)


def test_random_prompts_span_the_vocabulary_without_special_tokens(server):
    tok = server.client.engine.tokenizer
    reqs = build_requests(_args(base_url=server.url, num_prompts=8, random_input_len=64), server.url, AUTH)
    ids = [t for r in reqs for t in r.prompt]
    assert len(ids) == 8 * 64 and max(ids) > 255
    assert all(0 <= t < tok.num_base_tokens for t in ids)  # every special id is >= num_base_tokens


def test_prefix_repetition_dataset(server, capsys):
    args = _args(dataset_name="prefix-repetition", num_prompts=6, prefix_repetition_prefix_len=5,
                 prefix_repetition_suffix_len=3, prefix_repetition_num_prefixes=2, prefix_repetition_output_len=2)
    reqs = build_requests(args, server.url, AUTH)
    prefixes = [tuple(r.prompt[:5]) for r in reqs]
    assert len(set(prefixes)) == 2 and sorted(prefixes.count(p) for p in set(prefixes)) == [3, 3]
    assert all(r.prompt_len == 8 and r.output_len == 2 for r in reqs)
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", "test-key", "--dataset-name",
               "prefix-repetition", "--num-prompts", "4", "--prefix-repetition-prefix-len", "6",
               "--prefix-repetition-suffix-len", "2", "--prefix-repetition-num-prefixes", "2",
               "--prefix-repetition-output-len", "2", "--ignore-eos", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{'Total input tokens:':<40} 32" in out and f"{'Total generated tokens:':<40} 8" in out


def test_sharegpt_file(server, tmp_path, capsys):
    conv = lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}  # noqa: E731
    data = [conv("Tell me about linear attention please.", "It keeps a recurrent state instead of a cache."),
            conv("hi", "too short to keep"),  # prompt under 4 tokens: skipped
            {"conversations": [{"from": "human", "value": "only one turn"}]},
            conv("What is a mixture of experts model?", "A router sends each token to a few experts.")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    tok = server.client.engine.tokenizer
    reqs = build_requests(_args(dataset_name="sharegpt", dataset_path=str(path), num_prompts=2), server.url, AUTH)
    assert sorted(r.prompt for r in reqs) == [data[0]["conversations"][0]["value"],
                                             data[3]["conversations"][0]["value"]]
    for r in reqs:
        reply = next(d["conversations"][1]["value"] for d in data if d["conversations"][0]["value"] == r.prompt)
        assert r.prompt_len == len(tok.encode(r.prompt)) and r.output_len == len(tok.encode(reply))
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", "test-key", "--backend", "openai-chat",
               "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "2",
               "--sharegpt-output-len", "3", "--ignore-eos", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{'Successful requests:':<40} 2" in out and f"{'Total generated tokens:':<40} 6" in out


def test_sharegpt_needs_a_readable_file(server, tmp_path):
    with pytest.raises(SystemExit, match="--dataset-path"):
        main([*BASE, "--base-url", server.url, "--dataset-name", "sharegpt"])
    with pytest.raises(SystemExit, match="missing.json"):
        main([*BASE, "--base-url", server.url, "--dataset-name", "sharegpt", "--dataset-path",
              str(tmp_path / "missing.json")])
