"""The offline CLI commands run end to end on the tiny model (CPU): generate, chat (offline, --quick and
stdin), bench latency and bench throughput; a bad flag is a clear error."""

from __future__ import annotations

import io
import json
import sys

import pytest

from kimi_linear.cli.main import main


def test_generate_streams_text(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--device", "cpu", "--prompt", "Kimi Linear is",
                 "--max-tokens", "6", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "[6 tokens, finish_reason=length]" in captured.err
    assert captured.out.strip()


def test_generate_token_ids_without_tokenizer(tmp_path, capsys):
    from kimi_linear.tools.create import create_checkpoint

    create_checkpoint(tmp_path / "m", "tiny", progress=False)
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "m" / f).unlink()
    assert main(["generate", str(tmp_path / "m"), "--device", "cpu", "--prompt-token-ids", "1,2,3",
                 "--max-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 4 and all(t.isdigit() for t in out)


def test_chat_quick_and_stdin(tiny_checkpoint, capsys, monkeypatch):
    assert main(["chat", str(tiny_checkpoint), "--device", "cpu", "--quick", "Hello", "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/clear\nHello\n/exit\n"))
    assert main(["chat", str(tiny_checkpoint), "--device", "cpu", "--max-tokens", "5", "--temperature", "0"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines == [first.strip(), first.strip()]  # /clear restarts: the same greedy reply


def test_bench_latency_and_throughput(tiny_checkpoint, capsys):
    assert main(["bench", "latency", str(tiny_checkpoint), "--device", "cpu", "--batch-size", "2", "--input-len", "8",
                 "--output-len", "3", "--num-iters", "2", "--num-iters-warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "Avg latency:" in out and "99% percentile latency:" in out
    assert main(["bench", "throughput", str(tiny_checkpoint), "--device", "cpu", "--num-prompts", "3",
                 "--input-len", "8", "--output-len", "3"]) == 0
    assert "Throughput:" in capsys.readouterr().out


def test_bench_throughput_random_range_ratio(tiny_checkpoint, capsys, tmp_path):
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", str(tiny_checkpoint), "--device", "cpu", "--num-prompts", "6", "--input-len",
                 "10", "--output-len", "4", "--random-range-ratio", "0.5", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_requests"] == 6 and 6 * (5 + 2) <= r["total_num_tokens"] <= 6 * (15 + 6)
    with pytest.raises(SystemExit, match="--random-range-ratio must be in"):
        main(["bench", "throughput", str(tiny_checkpoint), "--device", "cpu", "--random-range-ratio", "1.5"])


def test_bad_engine_flag_is_a_clear_error(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--device", "cpu", "--gpu-memory-utilization", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "gpu_memory_utilization" in err
    for bad in (["serve", "--max-model-len", "lots"], ["generate", "--max-num-seqs", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
        assert "--max" in capsys.readouterr().err
